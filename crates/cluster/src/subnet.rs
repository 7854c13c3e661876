//! The address plan: one IPv4 subnet on the cluster's bridge.
//!
//! Node `i` (1-based) gets host number `i`, so in the default
//! `10.77.0.0/16` node 1 is 10.77.0.1 and node 100 is 10.77.0.100; the
//! origin takes the last host number (10.77.255.254), well away from the
//! nodes whatever their count. The bridge itself has no address: it is a
//! switch, not a host.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 subnet, `a.b.c.d/len`, with the host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// Why a subnet did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSubnetError {
    #[error("subnet {0:?} is not of the form a.b.c.d/len")]
    Syntax(String),
    #[error("subnet {0:?} has a prefix length outside 8..=30")]
    PrefixLen(String),
    #[error("subnet {input:?} has host bits set (did you mean {network}?)")]
    HostBits { input: String, network: String },
}

impl Subnet {
    /// The default, a private range unlikely to be in use on the machine
    /// (not that it matters: the addresses exist only inside the cluster's
    /// namespaces).
    pub const DEFAULT: Subnet = Subnet {
        network: Ipv4Addr::new(10, 77, 0, 0),
        prefix_len: 16,
    };

    /// The subnet `network/prefix_len`; `None` if the prefix length is
    /// outside 8..=30 or `network` has host bits set.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Option<Subnet> {
        let subnet = Subnet {
            network,
            prefix_len,
        };
        ((8..=30).contains(&prefix_len) && u32::from(network) & !subnet.mask() == 0)
            .then_some(subnet)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix_len)
    }

    /// How many nodes fit beside the origin: every host number but the
    /// origin's, the network's and the broadcast address.
    pub fn max_nodes(&self) -> usize {
        (1usize << (32 - self.prefix_len)) - 3
    }

    /// Address of node `index` (1-based); `None` past [`Subnet::max_nodes`].
    pub fn node_addr(&self, index: usize) -> Option<Ipv4Addr> {
        (1..=self.max_nodes())
            .contains(&index)
            .then(|| Ipv4Addr::from(u32::from(self.network) + index as u32))
    }

    /// Address of the origin: the last host number.
    pub fn origin_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.network) | !self.mask()) - 1)
    }
}

impl Default for Subnet {
    fn default() -> Subnet {
        Subnet::DEFAULT
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = ParseSubnetError;

    fn from_str(input: &str) -> Result<Subnet, ParseSubnetError> {
        let syntax = || ParseSubnetError::Syntax(input.to_owned());
        let (addr, len) = input.trim().split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let len: u8 = len.parse().map_err(|_| syntax())?;
        if !(8..=30).contains(&len) {
            return Err(ParseSubnetError::PrefixLen(input.to_owned()));
        }
        let mask = u32::MAX << (32 - len);
        Subnet::new(addr, len).ok_or_else(|| ParseSubnetError::HostBits {
            input: input.to_owned(),
            network: format!("{}/{len}", Ipv4Addr::from(u32::from(addr) & mask)),
        })
    }
}

impl serde::Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Subnet, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan() {
        let s = Subnet::DEFAULT;
        assert_eq!(s.to_string(), "10.77.0.0/16");
        assert_eq!(s.node_addr(1), Some(Ipv4Addr::new(10, 77, 0, 1)));
        assert_eq!(s.node_addr(100), Some(Ipv4Addr::new(10, 77, 0, 100)));
        assert_eq!(s.node_addr(256), Some(Ipv4Addr::new(10, 77, 1, 0)));
        assert_eq!(s.origin_addr(), Ipv4Addr::new(10, 77, 255, 254));
        assert_eq!(s.node_addr(0), None);
        assert_eq!(s.max_nodes(), 65533);
        assert_eq!(
            s.node_addr(s.max_nodes()),
            Some(Ipv4Addr::new(10, 77, 255, 253))
        );
        assert_eq!(s.node_addr(s.max_nodes() + 1), None);
    }

    #[test]
    fn small_subnet() {
        let s: Subnet = "192.168.5.0/29".parse().unwrap();
        assert_eq!(s.max_nodes(), 5);
        assert_eq!(s.origin_addr(), Ipv4Addr::new(192, 168, 5, 6));
        assert_eq!(s.node_addr(5), Some(Ipv4Addr::new(192, 168, 5, 5)));
        assert_eq!(s.node_addr(6), None);
    }

    #[test]
    fn refuses_bad_input() {
        use ParseSubnetError::*;
        let err = |s: &str| s.parse::<Subnet>().unwrap_err();
        assert!(matches!(err("10.77.0.0"), Syntax(_)));
        assert!(matches!(err("10.77.0/16"), Syntax(_)));
        assert!(matches!(err("10.77.0.0/x"), Syntax(_)));
        assert!(matches!(err("10.77.0.0/31"), PrefixLen(_)));
        assert!(matches!(err("10.0.0.0/4"), PrefixLen(_)));
        assert_eq!(
            err("10.77.3.1/16"),
            HostBits {
                input: "10.77.3.1/16".into(),
                network: "10.77.0.0/16".into()
            }
        );
    }

    #[test]
    fn serde_round_trip_as_string() {
        let json = serde_json::to_string(&Subnet::DEFAULT).unwrap();
        assert_eq!(json, "\"10.77.0.0/16\"");
        assert_eq!(
            serde_json::from_str::<Subnet>(&json).unwrap(),
            Subnet::DEFAULT
        );
    }
}
