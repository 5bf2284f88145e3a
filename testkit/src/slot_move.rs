//! Moving one hash slot of a [`RedisCluster`] step by step, as `redis-cli --cluster reshard`
//! does, so that a test can act between the steps; and the cluster's node ids and slot owners.

use crate::redis::RedisCluster;

/// Moving one hash slot of a [`RedisCluster`] from its owner to another master, step by step as
/// `redis-cli --cluster reshard` does, so a test can act between the steps.
pub struct SlotMove<'a> {
    cluster: &'a RedisCluster,
    pub slot: u16,
    pub from: usize,
    pub to: usize,
}

impl RedisCluster {
    /// The node id of each node, in `nodes` order.
    pub async fn node_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for node in &self.nodes {
            ids.push(node.cli(&["cluster", "myid"]).await);
        }
        ids
    }

    pub async fn slot_of(&self, key: &str) -> u16 {
        let slot = self.nodes[0].cli(&["cluster", "keyslot", key]).await;
        slot.parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key}: {slot}"))
    }

    /// Index of the node that owns `slot` (as node 0 sees the slot map).
    pub async fn owner_of(&self, slot: u16) -> usize {
        let ids = self.node_ids().await;
        let nodes = self.nodes[0].cli(&["cluster", "nodes"]).await;
        // `<id> <addr> <flags> <master> <ping> <pong> <epoch> <link> <slot or range>...`
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let owns = fields.iter().skip(8).any(|range| {
                let mut ends = range.splitn(2, '-').map(|n| n.parse::<u16>());
                match (ends.next(), ends.next()) {
                    (Some(Ok(a)), Some(Ok(b))) => (a..=b).contains(&slot),
                    (Some(Ok(a)), None) => a == slot,
                    _ => false,
                }
            });
            if owns {
                if let Some(n) = ids
                    .iter()
                    .position(|id| Some(&id.as_str()) == fields.first())
                {
                    return n;
                }
            }
        }
        panic!("no owner of slot {slot} in {nodes}");
    }

    /// Starts moving `slot` to node `to`: IMPORTING on the target, MIGRATING on the source.
    pub async fn begin_slot_move(&self, slot: u16, to: usize) -> SlotMove<'_> {
        let from = self.owner_of(slot).await;
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        let ids = self.node_ids().await;
        let s = slot.to_string();
        let r = self.nodes[to]
            .cli(&["cluster", "setslot", &s, "importing", &ids[from]])
            .await;
        assert_eq!(r, "OK", "SETSLOT IMPORTING: {r}");
        let r = self.nodes[from]
            .cli(&["cluster", "setslot", &s, "migrating", &ids[to]])
            .await;
        assert_eq!(r, "OK", "SETSLOT MIGRATING: {r}");
        SlotMove {
            cluster: self,
            slot,
            from,
            to,
        }
    }
}

impl SlotMove<'_> {
    /// MIGRATEs every key of the slot to the target.
    pub async fn move_keys(&self) {
        let (from, to) = (&self.cluster.nodes[self.from], &self.cluster.nodes[self.to]);
        let s = self.slot.to_string();
        loop {
            let keys = from.cli(&["cluster", "getkeysinslot", &s, "1000"]).await;
            let keys: Vec<&str> = keys
                .lines()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .collect();
            if keys.is_empty() {
                return;
            }
            let port = to.port.to_string();
            let mut args = vec!["migrate", "127.0.0.1", &port, "", "0", "5000", "keys"];
            args.extend(keys);
            let r = from.cli(&args).await;
            assert!(r == "OK" || r == "NOKEY", "MIGRATE: {r}");
        }
    }

    /// Assigns the slot to the target on every master (target and source first).
    pub async fn finish(self) {
        let ids = self.cluster.node_ids().await;
        let s = self.slot.to_string();
        let mut order = vec![self.to, self.from];
        order.extend((0..self.cluster.nodes.len()).filter(|n| *n != self.to && *n != self.from));
        for n in order {
            let r = self.cluster.nodes[n]
                .cli(&["cluster", "setslot", &s, "node", &ids[self.to]])
                .await;
            assert_eq!(r, "OK", "SETSLOT NODE on node {n}: {r}");
        }
    }
}
