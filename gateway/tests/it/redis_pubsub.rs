//! The pub/sub connections to Redis killed (`CLIENT KILL TYPE pubsub`) while publishing: the
//! nodes notice and reconnect, and no subscriber misses anything (gaps are filled from history).

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_connection_killed_no_subscriber_misses_anything() {
    let redis = RedisServer::start(RedisOpts::default()).await;
    let nodes = start_nodes(&Backend::standalone(&redis), 2, &PATIENT).await;
    let channels: Vec<String> = (0..4).map(|i| format!("pk:{i}")).collect();

    let mut subs = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let all = Sub::connect(&format!("all@node{n}"), node.addr).await;
        for c in &channels {
            all.subscribe(c, None).await;
        }
        let one = Sub::connect(&format!("one@node{n}"), node.addr).await;
        one.subscribe(&channels[n], None).await;
        subs.push((all, channels.clone()));
        subs.push((one, vec![channels[n].clone()]));
    }

    let acks = Acks::default();
    let http = Publisher::start(
        nodes[0].addr,
        Via::Http,
        &channels,
        "http",
        &acks,
        1 << 40,
        2,
    )
    .await;
    let ws = Publisher::start(nodes[1].addr, Via::Ws, &channels, "ws", &acks, 1 << 40, 4).await;

    let mut base = Vec::new();
    for node in &nodes {
        base.push(metric_of(node.addr, "gateway_backplane_pubsub_reconnects_total").await);
        assert_eq!(
            metric_of(node.addr, "gateway_backplane_pubsub_healthy").await,
            1.0,
            "{}: pub/sub not healthy before the kills",
            node.name
        );
    }

    for round in 1..=3u32 {
        // Publications are flowing to every subscriber right before the kill.
        for (sub, chans) in &subs {
            let had: usize = chans.iter().map(|c| sub.log().pub_count(c)).sum();
            sub.wait_for("publications before the kill", WAIT, |log| {
                chans.iter().map(|c| log.pub_count(c)).sum::<usize>() >= had + 10
            })
            .await;
        }
        let killed = redis.cli(&["client", "kill", "type", "pubsub"]).await;
        let killed: usize = killed
            .parse()
            .unwrap_or_else(|_| panic!("CLIENT KILL TYPE pubsub answered {killed:?}"));
        assert!(
            killed >= nodes.len(),
            "round {round}: CLIENT KILL TYPE pubsub killed {killed} connections, expected at \
             least one per node"
        );
        for (node, base) in nodes.iter().zip(&base) {
            let addr = node.addr;
            let want = base + f64::from(round);
            poll_until(
                &format!(
                    "{}: reconnect #{round} noticed and healthy again",
                    node.name
                ),
                WAIT,
                || async move {
                    let text = metrics_text(addr).await;
                    let reconnects =
                        metric(&text, "gateway_backplane_pubsub_reconnects_total", &[])?;
                    let healthy = metric(&text, "gateway_backplane_pubsub_healthy", &[])?;
                    (reconnects >= want && healthy == 1.0).then_some(())
                },
            )
            .await;
        }
    }
    for node in &nodes {
        node.wait_ready().await;
    }
    http.stop().await;
    ws.stop().await;

    assert_every_subscriber_got_every_ack(&acks, &subs).await;
    for node in &nodes {
        let text = metrics_text(node.addr).await;
        eprintln!(
            "{}: reconnects {:?}, gap fills {:?}",
            node.name,
            metric(&text, "gateway_backplane_pubsub_reconnects_total", &[]),
            metric(&text, "gateway_backplane_gap_fills_total", &[])
        );
    }
}
