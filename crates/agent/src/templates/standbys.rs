//! The template service's state: the standby pool (clones started and
//! paused ahead of demand, per template), which templates are being
//! refilled and which are being removed. The operations on templates (in
//! `templates/mod.rs`) own its changes.

/// The standby pool: clones started and paused, per template.
#[derive(Debug, Default)]
pub struct Standbys {
    pub(crate) ready: std::collections::HashMap<String, Vec<String>>,
    pub(crate) filling: std::collections::HashSet<String>,
    /// Templates being removed: no standby is made for them.
    pub(crate) removing: std::collections::HashSet<String>,
}
