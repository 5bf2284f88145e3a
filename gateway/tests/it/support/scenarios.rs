//! Scenarios shared by the standalone-Redis and the Redis Cluster tests, over gateway processes.

use std::collections::HashMap;

use testkit::*;

/// Three nodes; on every node one subscriber to every channel and one to a third of them;
/// every node publishes through HTTP and WebSocket. Every subscriber must receive every
/// publication of its channels, in order, exactly once.
pub async fn scenario_fanout(backend: &Backend, channels: &[String], per_publisher: u64) {
    let nodes = start_nodes(backend, 3, &PATIENT).await;
    let mut subs: Vec<(Sub, Vec<String>)> = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let all = Sub::connect(&format!("all@node{n}"), node.addr).await;
        let part = Sub::connect(&format!("part@node{n}"), node.addr).await;
        let mine: Vec<String> = channels
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == n)
            .map(|(_, c)| c.clone())
            .collect();
        for c in channels {
            let r = all.subscribe(c, None).await;
            assert_eq!(r["offset"], 0, "fresh channel {c}: {r}");
        }
        for c in &mine {
            part.subscribe(c, None).await;
        }
        subs.push((all, channels.to_vec()));
        subs.push((part, mine));
    }

    let acks = Acks::default();
    let mut publishers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for via in [Via::Http, Via::Ws] {
            let tag = format!("node{n}-{via:?}");
            publishers.push(
                Publisher::start(node.addr, via, channels, &tag, &acks, per_publisher, 4).await,
            );
        }
    }
    let mut total = 0;
    for p in publishers {
        total += p.finish().await;
    }
    assert_eq!(total, per_publisher * 6);

    assert_every_subscriber_got_every_ack(&acks, &subs).await;
    for (sub, _) in &subs {
        assert!(
            sub.log().unexpected.is_empty(),
            "{:?}",
            sub.log().unexpected
        );
    }
}

/// Three nodes A, B, C; clients on A, a publisher on B. A is killed with SIGKILL mid-stream;
/// its clients reconnect to B or C with their last positions and must end up with every acked
/// publication after their start, in order, exactly once.
pub async fn scenario_kill9(backend: &Backend, channels: &[String]) {
    let mut nodes = start_nodes(backend, 3, &PATIENT).await;
    let clients_n = 4;
    let mut clients: Vec<(Sub, Vec<String>)> = Vec::new();
    for k in 0..clients_n {
        let mine: Vec<String> = channels
            .iter()
            .enumerate()
            .filter(|(i, _)| i % clients_n == k || *i == 0)
            .map(|(_, c)| c.clone())
            .collect();
        let sub = Sub::connect(&format!("client{k}@A"), nodes[0].addr).await;
        for c in &mine {
            sub.subscribe(c, None).await;
        }
        clients.push((sub, mine));
    }
    let start: Vec<HashMap<String, (String, u64)>> = clients
        .iter()
        .map(|(s, chans)| {
            chans
                .iter()
                .map(|c| (c.clone(), s.log().position(c).unwrap()))
                .collect()
        })
        .collect();

    let acks = Acks::default();
    let publisher =
        Publisher::start(nodes[1].addr, Via::Ws, channels, "B", &acks, 200_000, 8).await;

    // Mid-stream: every client has received something on every channel.
    for (sub, chans) in &clients {
        for c in chans {
            sub.wait_for(&format!("progress on {c}"), WAIT, |log| {
                log.pub_count(c) >= 10
            })
            .await;
        }
    }
    nodes[0].kill9();

    let mut resumed: Vec<Sub> = Vec::new();
    for (k, (old, chans)) in clients.iter().enumerate() {
        old.wait_ended().await;
        let target = &nodes[1 + k % 2];
        let sub = Sub::connect(&format!("client{k}@{}", target.name), target.addr).await;
        for c in chans {
            let pos = old.log().position(c).unwrap();
            let r = sub.subscribe(c, Some(&pos)).await;
            assert_eq!(
                r["recovered"], true,
                "{}: resume of {c} from {pos:?} not recovered: {r}",
                sub.name
            );
            assert_eq!(r["epoch"], pos.0.as_str(), "{}: {r}", sub.name);
        }
        resumed.push(sub);
    }
    // Live traffic after the resume, then a bounded end.
    for (sub, (_, chans)) in resumed.iter().zip(&clients) {
        for c in chans {
            sub.wait_for(&format!("live publications on {c}"), WAIT, |log| {
                log.pub_count(c) >= 20
            })
            .await;
        }
    }
    publisher.stop().await;

    for c in channels {
        let (_, a) = acks.single(c);
        assert_contiguous(c, &a);
    }
    for (k, (sub, (old, chans))) in resumed.iter().zip(&clients).enumerate() {
        wait_caught_up(sub, &acks, chans).await;
        for c in chans {
            let (epoch, a) = acks.single(c);
            let (start_epoch, start_offset) = &start[k][c];
            // A channel with no publication yet has no epoch (""): offset 0 carries none.
            if *start_offset > 0 {
                assert_eq!(start_epoch, &epoch);
            } else {
                assert!(
                    start_epoch.is_empty() || *start_epoch == epoch,
                    "{start_epoch}"
                );
            }
            let mut all = old.pubs(c);
            all.extend(sub.pubs(c));
            assert_exact(
                &format!("client{k} on {c} (A then {})", sub.name),
                &all,
                &epoch,
                &a,
                *start_offset,
            );
        }
    }
}
