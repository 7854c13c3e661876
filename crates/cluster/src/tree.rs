//! How a cluster's agents are wired: a re-export tree, as in VirtMan.
//!
//! Every node fetches from its parent relay first (a `--peer`) and relays
//! for its children, so a storm spreads over the tree instead of queueing
//! at the origin, and the origin (whose only child is node1) sends each
//! chunk once. The origin stays every node's fallback: a dead relay costs
//! its subtree a retry, not its images. Fanout 0 makes every node fetch
//! from the origin directly (the origin-only baseline).

use crate::{Cluster, Node};

/// Port every agent serves peers on, inside its namespace.
pub const PEER_PORT: u16 = 7070;

/// The host node `node` (1-based) fetches from (0 = the origin).
///
/// The origin feeds one relay, node1, which heads a `fanout`-ary tree of
/// the other nodes. The nodes 1..=n of a larger tree form a tree of their
/// own (a node's parent always has a smaller number), so a benchmark can use
/// a prefix of one cluster's nodes.
pub fn parent(node: usize, fanout: usize) -> usize {
    match (node, fanout) {
        (_, 0) | (1, _) => 0,
        _ => (node - 2) / fanout + 1,
    }
}

/// The peer listener's URL of `n`'s agent.
pub fn peer_url(n: &Node) -> String {
    format!("https://{}:{PEER_PORT}", n.ip)
}

/// Agent arguments of the origin: it listens for peers and takes pushes.
pub fn origin_args(cluster: &Cluster) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("{}:{PEER_PORT}", cluster.origin.ip),
        "--accept-push".into(),
    ]
}

/// Agent arguments of node `node` (1-based) in a `fanout`-ary tree.
pub fn node_args(cluster: &Cluster, node: usize, fanout: usize) -> Vec<String> {
    let mut args = vec![
        "--listen".to_string(),
        format!("{}:{PEER_PORT}", cluster.nodes[node - 1].ip),
        "--origin".into(),
        peer_url(&cluster.origin),
        "--relay".into(),
        // The hosts of one cluster trust each other with their VMs.
        "--accept-migrations".into(),
    ];
    // Chunks come from the parent relay first; the origin is only the
    // fallback, for when the parent is dead.
    if let p @ 1.. = parent(node, fanout) {
        args.extend(["--peer".into(), peer_url(&cluster.nodes[p - 1])]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::parent;

    #[test]
    fn tree_parents() {
        // node1 under the origin; nodes 2..=5 under node1; 6..=9 under node2.
        let parents: Vec<usize> = (1..=10).map(|n| parent(n, 4)).collect();
        assert_eq!(parents, vec![0, 1, 1, 1, 1, 2, 2, 2, 2, 3]);
        assert_eq!(parent(100, 0), 0);
        assert_eq!(
            (1..=4).map(|n| parent(n, 1)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        for f in 1..5 {
            assert!((2..200).all(|n| parent(n, f) < n));
        }
    }
}
