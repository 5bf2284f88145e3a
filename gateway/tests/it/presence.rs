//! Presence (#15): who is in a channel, the same answer on every node and over every form (the
//! WebSocket `presence` command, `GET /presence`, `GET /api/presence`); join and leave events in
//! their place among the channel's publications, for WebSocket, SSE and long-poll subscribers;
//! and no ghosts: the members of a node killed with SIGKILL leave within `presence.ttl`, each
//! announced once to every remaining subscriber, and a drained node's members leave at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::support::*;
use gateway::config::{Access, NamespaceConfig};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const KEY: &str = "presence-test-key";
const ROOM: &str = "room:lobby";

fn token(sub: &str, info: Option<Value>) -> String {
    let mut claims = json!({"sub": sub, "exp": 4_000_000_000u64});
    if let Some(info) = info {
        claims["info"] = info;
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(KEY.as_bytes()),
    )
    .unwrap()
}

fn ws_path(sub: &str) -> String {
    format!("/ws?token={}", token(sub, None))
}

/// `room:` announces members, `quiet:` keeps presence without events, `secret:` needs a token,
/// the default namespace keeps none.
fn namespaces(config: &mut gateway::Config) {
    config.auth.jwt_hs256_keys = vec![KEY.into()];
    let ns = |presence, join_leave, subscribe| NamespaceConfig {
        presence,
        join_leave,
        subscribe,
        ..NamespaceConfig::default()
    };
    let named = &mut config.channels.namespaces;
    named.insert("room".into(), ns(true, true, Access::Anonymous));
    named.insert("quiet".into(), ns(true, false, Access::Anonymous));
    named.insert("secret".into(), ns(true, true, Access::Authenticated));
}

/// The same namespaces for gateway processes, and a short `presence.ttl`.
fn process_env(ttl: &'static str) -> Vec<(&'static str, &'static str)> {
    let mut env = vec![
        ("GATEWAY__AUTH__JWT_HS256_KEYS", KEY),
        ("GATEWAY__CHANNELS__NAMESPACES__ROOM__PRESENCE", "true"),
        ("GATEWAY__CHANNELS__NAMESPACES__ROOM__JOIN_LEAVE", "true"),
        ("GATEWAY__PRESENCE__TTL", ttl),
    ];
    env.extend(PATIENT);
    env
}

/// What a log shows of one channel, in order: `sub`, `join <user>`, `leave <user>`, `pub <n>`.
fn transcript(sub: &Sub, channel: &str) -> Vec<String> {
    sub.items(channel)
        .iter()
        .map(|item| match item {
            Item::Subscribed(_) => "sub".to_string(),
            Item::Join(m) => format!("join {}", m["user"].as_str().unwrap_or("-")),
            Item::Leave(m) => format!("leave {}", m["user"].as_str().unwrap_or("-")),
            Item::Pub(p) => format!("pub {}", p.data["n"]),
            Item::Reset { reason, .. } => format!("reset {reason}"),
        })
        .collect()
}

async fn wait_transcript_has(sub: &Sub, channel: &str, line: &str) {
    let (channel_owned, line_owned) = (channel.to_string(), line.to_string());
    sub.wait_for(&format!("`{line}` on {channel}"), WAIT, move |log| {
        log.channels.get(&channel_owned).is_some_and(|items| {
            items.iter().any(|i| match i {
                Item::Join(m) => {
                    format!("join {}", m["user"].as_str().unwrap_or("-")) == line_owned
                }
                Item::Leave(m) => {
                    format!("leave {}", m["user"].as_str().unwrap_or("-")) == line_owned
                }
                Item::Pub(p) => format!("pub {}", p.data["n"]) == line_owned,
                _ => false,
            })
        })
    })
    .await;
}

/// The users of a presence answer's `clients`, sorted.
fn users(answer: &Value) -> Vec<String> {
    let mut users: Vec<String> = answer["clients"]
        .as_array()
        .unwrap_or_else(|| panic!("no clients in {answer}"))
        .iter()
        .map(|m| m["user"].as_str().unwrap_or("-").to_string())
        .collect();
    users.sort();
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_lists_members_and_announces_them_in_order_with_publications() {
    let node = Node::with(namespaces).await;
    let alice = Sub::connect_path("alice", node.addr, &ws_path("alice")).await;
    alice.subscribe(ROOM, None).await;
    wait_transcript_has(&alice, ROOM, "join alice").await;
    publish(&node, ROOM, json!({"n": 1})).await;

    let bob_token = token("bob", Some(json!({"name": "Bob", "seat": 7})));
    let bob = Sub::connect_path("bob", node.addr, &format!("/ws?token={bob_token}")).await;
    bob.subscribe(ROOM, None).await;
    wait_transcript_has(&alice, ROOM, "join bob").await;
    publish(&node, ROOM, json!({"n": 2})).await;

    // Every form of the question gets the same answer.
    let over_ws = alice
        .request(json!({"op": "presence", "channel": ROOM}))
        .await;
    let over_ws = over_ws["result"].clone();
    assert_eq!(over_ws["count"], 2, "{over_ws}");
    assert_eq!(over_ws["users"], 2, "{over_ws}");
    assert_eq!(users(&over_ws), ["alice", "bob"]);
    let bob_entry = over_ws["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user"] == "bob")
        .unwrap();
    assert_eq!(bob_entry["info"], json!({"name": "Bob", "seat": 7}));
    let (status, api) = get(&node, &format!("/api/presence?channel={ROOM}")).await;
    assert_eq!(status, 200, "{api}");
    assert_eq!(users(&api), ["alice", "bob"]);
    let (status, public) = get(&node, &format!("/presence?channel={ROOM}")).await;
    assert_eq!(status, 200, "{public}");
    assert_eq!(users(&public), ["alice", "bob"]);
    let (status, counted) = get(
        &node,
        &format!("/api/presence?channel={ROOM}&count_only=true"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(counted, json!({"channel": ROOM, "count": 2, "users": 2}));

    bob.request(json!({"op": "unsubscribe", "channel": ROOM}))
        .await;
    wait_transcript_has(&alice, ROOM, "leave bob").await;
    publish(&node, ROOM, json!({"n": 3})).await;

    // An anonymous member, gone with its connection.
    let anonymous = Sub::connect("anonymous", node.addr).await;
    anonymous.subscribe(ROOM, None).await;
    wait_transcript_has(&alice, ROOM, "join -").await;
    anonymous.close().await;
    wait_transcript_has(&alice, ROOM, "leave -").await;
    publish(&node, ROOM, json!({"n": 4})).await;
    wait_transcript_has(&alice, ROOM, "pub 4").await;

    assert_eq!(
        transcript(&alice, ROOM),
        [
            "sub",
            "join alice",
            "pub 1",
            "join bob",
            "pub 2",
            "leave bob",
            "pub 3",
            "join -",
            "leave -",
            "pub 4"
        ]
    );
    let (_, left) = get(&node, &format!("/api/presence?channel={ROOM}")).await;
    assert_eq!(users(&left), ["alice"]);
    assert!(
        alice.log().unexpected.is_empty(),
        "{:?}",
        alice.log().unexpected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_refused_where_it_is_off_or_not_allowed() {
    let node = Node::with(namespaces).await;
    // Presence without join/leave: counted, never announced.
    let quiet = Sub::connect("quiet", node.addr).await;
    quiet.subscribe("quiet:a", None).await;
    let (status, answer) = get(&node, "/api/presence?channel=quiet:a").await;
    assert_eq!(
        (status, answer["count"].clone()),
        (200, json!(1)),
        "{answer}"
    );
    publish(&node, "quiet:a", json!({"n": 1})).await;
    quiet.wait_offset("quiet:a", 1).await;
    assert_eq!(transcript(&quiet, "quiet:a"), ["sub", "pub 1"]);

    // A namespace without presence.
    let reply = quiet
        .request(json!({"op": "presence", "channel": "plain"}))
        .await;
    assert_eq!(reply["error"]["code"], "presence_not_enabled", "{reply}");
    let got = get(&node, "/api/presence?channel=plain").await;
    assert_error(&got, 400, "presence_not_enabled");

    // Bad queries.
    assert_error(&get(&node, "/api/presence").await, 400, "bad_request");
    assert_error(
        &get(&node, "/api/presence?channel=a%20b").await,
        400,
        "invalid_channel",
    );
    assert_error(
        &get(&node, "/api/presence?channel=room:a&count_only=maybe").await,
        400,
        "bad_request",
    );

    // Shown to those who may subscribe, and only them.
    assert_error(
        &get(&node, "/presence?channel=secret:a").await,
        401,
        "unauthorized",
    );
    let reply = quiet
        .request(json!({"op": "presence", "channel": "secret:a"}))
        .await;
    assert_eq!(reply["error"]["code"], "unauthorized", "{reply}");
    let with_token = format!("/presence?channel=secret:a&token={}", token("eve", None));
    let (status, answer) = get(&node, &with_token).await;
    assert_eq!(
        (status, answer["count"].clone()),
        (200, json!(0)),
        "{answer}"
    );
    // The node keeps serving: the subscription still works.
    publish(&node, "quiet:a", json!({"n": 2})).await;
    quiet.wait_offset("quiet:a", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_are_members_and_sse_and_poll_receive_join_and_leave() {
    let node = Node::with(namespaces).await;
    let watcher = Sub::connect_path("watcher", node.addr, &ws_path("watcher")).await;
    watcher.subscribe(ROOM, None).await;

    // An SSE stream is a member under its token's user, and sees joins as `join` events.
    let query = format!("channel={ROOM}&token={}", token("sse-user", None));
    let mut sse = Sse::open_query(&node, &query).await;
    sse.connected().await;
    wait_transcript_has(&watcher, ROOM, "join sse-user").await;
    let own_join = sse.next_event().await;
    assert_eq!(own_join.kind(), "join");
    assert_eq!(own_join.id, None, "a presence event moves no position");
    assert_eq!(own_join.json()["join"]["user"], "sse-user");

    // A long-poll is no member but gets the events.
    let http = http();
    let poll_url = node.url(&format!("/poll?channel={ROOM}&timeout=20"));
    let first = http.get(&poll_url).send().await.unwrap();
    let first: Value = first.json().await.unwrap();
    let cursor = first["cursor"].as_str().unwrap().to_string();
    let waiting = tokio::spawn({
        let url = format!("{poll_url}&cursor={cursor}");
        async move { http.get(&url).send().await.unwrap().json::<Value>().await }
    });
    let (_, answer) = get(&node, &format!("/api/presence?channel={ROOM}")).await;
    assert_eq!(
        users(&answer),
        ["sse-user", "watcher"],
        "polls are no members"
    );

    let late = Sub::connect_path("late", node.addr, &ws_path("late")).await;
    late.subscribe(ROOM, None).await;
    let polled = within("the poll's answer", waiting).await.unwrap().unwrap();
    let events = polled["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["join"]["user"] == "late"),
        "{polled}"
    );
    let sse_join = sse.next_event().await;
    assert_eq!(
        (sse_join.kind(), sse_join.json()["join"]["user"].clone()),
        ("join", json!("late"))
    );
    drop(sse);
    wait_transcript_has(&watcher, ROOM, "leave sse-user").await;
}

/// Three nodes, two WebSocket members and an SSE member on each, two watchers. Presence agrees
/// on every node; then the third node is killed with SIGKILL: its members leave, each announced
/// exactly once to every remaining watcher, between the publications around the crash.
async fn scenario_presence_across_nodes_and_a_crash(backend: &Backend) {
    let env = process_env("3s");
    let mut nodes = start_nodes(backend, 3, &env).await;
    let watchers = [
        Sub::connect_path("w0", nodes[0].addr, &ws_path("w0")).await,
        Sub::connect_path("w1", nodes[1].addr, &ws_path("w1")).await,
    ];
    for w in &watchers {
        w.subscribe(ROOM, None).await;
    }
    let mut members = Vec::new();
    let mut streams = Vec::new();
    let mut expected: BTreeSet<String> = ["w0".to_string(), "w1".to_string()].into();
    for (n, node) in nodes.iter().enumerate() {
        for k in 0..2 {
            let user = format!("n{n}m{k}");
            let sub = Sub::connect_path(&user, node.addr, &ws_path(&user)).await;
            sub.subscribe(ROOM, None).await;
            members.push(sub);
            expected.insert(user);
        }
        let user = format!("n{n}sse");
        let query = format!("channel={ROOM}&token={}", token(&user, None));
        let mut sse = Sse::open_query(node, &query).await;
        sse.connected().await;
        streams.push(sse);
        expected.insert(user);
    }
    let expected: Vec<String> = expected.into_iter().collect();

    // Every node gives the same list, clients and all.
    let mut lists = BTreeMap::new();
    for node in &nodes {
        let answer = poll_until("presence on every node", WAIT, || async {
            let (_, answer) = get(node, &format!("/api/presence?channel={ROOM}")).await;
            (answer["clients"].is_array() && users(&answer) == expected).then_some(answer)
        })
        .await;
        assert_eq!(answer["count"], expected.len(), "{answer}");
        assert_eq!(answer["users"], expected.len(), "{answer}");
        let mut clients: Vec<String> = answer["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| format!("{}={}", m["user"], m["client"]))
            .collect();
        clients.sort();
        lists.insert(node.name.clone(), clients);
    }
    let first = lists.values().next().unwrap().clone();
    assert!(lists.values().all(|l| *l == first), "{lists:#?}");

    for w in &watchers {
        for user in expected.iter().filter(|u| u.starts_with('n')) {
            wait_transcript_has(w, ROOM, &format!("join {user}")).await;
        }
    }
    publish(&nodes[0], ROOM, json!({"n": 1})).await;
    for w in &watchers {
        wait_transcript_has(w, ROOM, "pub 1").await;
    }

    nodes[2].kill9();
    let lost = ["n2m0", "n2m1", "n2sse"];
    for w in &watchers {
        for user in lost {
            w.wait_for(&format!("the leave of {user}"), WAIT, |log| {
                log.presence_events(ROOM)
                    .iter()
                    .any(|(kind, m)| *kind == "leave" && m["user"] == user)
            })
            .await;
        }
    }
    for node in &nodes[..2] {
        poll_until("the lost members gone from presence", WAIT, || async {
            let (_, answer) = get(node, &format!("/api/presence?channel={ROOM}")).await;
            (answer["count"] == json!(expected.len() - lost.len())).then_some(())
        })
        .await;
    }
    // The survivors count the reaped members, once between them (a reaper counts when it is
    // done with the dead node); node 0 still holds its 3 members and its watcher.
    poll_until("the reaped members counted", WAIT, || async {
        let reaped = metric_of(&nodes[0], "gateway_presence_reaped_total").await
            + metric_of(&nodes[1], "gateway_presence_reaped_total").await;
        assert!(reaped <= lost.len() as f64, "counted twice: {reaped}");
        (reaped == lost.len() as f64).then_some(())
    })
    .await;
    assert_eq!(metric_of(&nodes[0], "gateway_presence_members").await, 4.0);
    publish(&nodes[0], ROOM, json!({"n": 2})).await;
    for w in &watchers {
        wait_transcript_has(w, ROOM, "pub 2").await;
        let transcript = transcript(w, ROOM);
        let at = |line: &str| transcript.iter().position(|l| l == line).unwrap();
        for user in lost {
            let leave = format!("leave {user}");
            let count = transcript.iter().filter(|l| **l == leave).count();
            assert_eq!(count, 1, "{}: {transcript:?}", w.name);
            assert!(at("pub 1") < at(&leave) && at(&leave) < at("pub 2"));
        }
        let other_leaves = transcript
            .iter()
            .filter(|l| l.starts_with("leave") && !lost.iter().any(|u| l.ends_with(u)))
            .count();
        assert_eq!(other_leaves, 0, "{}: {transcript:?}", w.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_presence_agrees_on_every_node_and_a_killed_node_leaves_once() {
    let redis = RedisServer::start(RedisOpts {
        aof: false,
        cluster: false,
    })
    .await;
    scenario_presence_across_nodes_and_a_crash(&Backend::standalone(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_presence_agrees_on_every_node_and_a_killed_node_leaves_once() {
    let cluster = RedisCluster::start(3).await;
    scenario_presence_across_nodes_and_a_crash(&cluster.backend()).await;
}

/// With a TTL far beyond the test, only the drain itself can remove the members in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_removes_its_members_at_once() {
    let redis = RedisServer::start(RedisOpts {
        aof: false,
        cluster: false,
    })
    .await;
    let mut env = process_env("1h");
    env.push(("GATEWAY__DRAIN__DELAY", "0s"));
    let mut nodes = start_nodes(&Backend::standalone(&redis), 2, &env).await;
    let watcher = Sub::connect_path("watcher", nodes[0].addr, &ws_path("watcher")).await;
    watcher.subscribe(ROOM, None).await;
    let mut leaving = Vec::new();
    for k in 0..2 {
        let user = format!("leaving{k}");
        let sub = Sub::connect_path(&user, nodes[1].addr, &ws_path(&user)).await;
        sub.subscribe(ROOM, None).await;
        wait_transcript_has(&watcher, ROOM, &format!("join {user}")).await;
        leaving.push(sub);
    }
    nodes[1].sigterm();
    for k in 0..2 {
        wait_transcript_has(&watcher, ROOM, &format!("leave leaving{k}")).await;
    }
    within_for(
        "the drained node to exit",
        Duration::from_secs(60),
        nodes[1].wait(),
    )
    .await;
    let (_, answer) = get(&nodes[0], &format!("/api/presence?channel={ROOM}")).await;
    assert_eq!(users(&answer), ["watcher"]);
}
