//! Fresh channels: channels this node holds no subscription for, so that subscribing to one
//! costs a new backplane subscription and a history read. Anonymous clients can name any
//! number of them, so each is charged to the client's IP (`limits.fresh_channels_per_request`,
//! `limits.fresh_channels_per_second`) before any work is done.

use std::net::IpAddr;
use std::sync::Arc;

use crate::node::Node;
use crate::security::limits::FreshRefusal;

/// Charges the fresh channels among `channels` to `ip`; a refusal is counted in
/// `gateway_limit_rejections_total` and nothing is charged.
pub(crate) fn charge(node: &Node, ip: IpAddr, channels: &[Arc<str>]) -> Result<(), FreshRefusal> {
    let hub = node.hub();
    let fresh = channels.iter().filter(|c| !hub.holds(c)).count();
    node.policy()
        .limits
        .take_fresh(ip, fresh)
        .inspect_err(|refusal| node.count_limit(refusal.label()))
}
