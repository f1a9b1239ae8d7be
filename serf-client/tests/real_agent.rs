//! The client against real `serf agent` processes on loopback: every command, events across
//! nodes, queries answered by another client, failures, auth, encryption and reconnects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serf_client::{
    Client, ClientConfig, ConnectionState, Error, ErrorBody, Event, EventStream, MemberEventKind,
    MemberStatus, MembersFilter, QueryParams, QueryRecord, Subscription, SubscriptionConfig,
    SubscriptionItem,
};
use serf_testkit::{Agent, AgentConfig, Cluster};

const WAIT: Duration = Duration::from_secs(20);

fn config(agent: &Agent) -> ClientConfig {
    let cfg = ClientConfig::new(agent.rpc_addr().to_string()).with_timeout(Duration::from_secs(5));
    match agent.rpc_auth() {
        Some(k) => cfg.with_auth(k),
        None => cfg,
    }
}

async fn connect(agent: &Agent) -> Client {
    Client::connect(config(agent)).await.expect("connect")
}

/// Waits for the first event that `pred` accepts, failing after `within`.
async fn wait_event(
    stream: &mut EventStream,
    within: Duration,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Err(_) => panic!("no matching event within {within:?}"),
            Ok(None) => panic!("stream ended"),
            Ok(Some(Err(e))) => panic!("stream error: {e}"),
            Ok(Some(Ok(ev))) if pred(&ev) => return ev,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Collects every event that arrives within `window`.
async fn drain(stream: &mut EventStream, window: Duration) -> Vec<Event> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, stream.next()).await {
        out.push(ev.expect("event"));
    }
    out
}

fn three_nodes(prefix: &str) -> Cluster {
    Cluster::start(vec![
        AgentConfig::new(format!("{prefix}-web"))
            .tag("role", "web")
            .tag("dc", "east"),
        AgentConfig::new(format!("{prefix}-db1")).tag("role", "db"),
        AgentConfig::new(format!("{prefix}-db2")).tag("role", "db"),
    ])
    .expect("cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_stats_coordinates_and_filters() {
    let cluster = three_nodes("mem");
    let c = connect(&cluster[0]).await;

    let members = c.members().await.unwrap();
    let mut names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["mem-db1", "mem-db2", "mem-web"]);
    let web = members.iter().find(|m| m.name == "mem-web").unwrap();
    assert_eq!(web.addr.to_string(), "127.0.0.1");
    assert_eq!(web.port, cluster[0].bind_addr().port());
    assert_eq!(web.status, MemberStatus::Alive);
    assert_eq!(web.role(), "web");
    assert_eq!(web.tags.get("dc").map(String::as_str), Some("east"));
    assert!(web.delegate_cur >= 2 && web.protocol_max >= web.protocol_min);

    // Anchored regexes, like `serf members -tag`.
    let mut f = MembersFilter::default();
    f.tags.insert("role".into(), "db".into());
    let mut dbs: Vec<_> = c
        .members_filtered(&f)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    dbs.sort();
    assert_eq!(dbs, ["mem-db1", "mem-db2"]);
    f.tags.insert("role".into(), "d".into());
    assert!(c.members_filtered(&f).await.unwrap().is_empty());
    let by_name = MembersFilter {
        name: "mem-w.*".into(),
        status: "alive".into(),
        ..Default::default()
    };
    assert_eq!(c.members_filtered(&by_name).await.unwrap().len(), 1);

    // A regex the agent cannot compile would make it drop the connection: refused here.
    let bad = MembersFilter {
        name: "(".into(),
        ..Default::default()
    };
    let err = c.members_filtered(&bad).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(err.to_string().contains("name"), "{err}");
    assert!(!c.is_closed());
    assert_eq!(c.members().await.unwrap().len(), 3);

    let stats = c.stats().await.unwrap();
    assert_eq!(stats["agent"]["name"], "mem-web");
    assert_eq!(stats["serf"]["members"], "3");
    assert_eq!(stats["tags"]["role"], "web");

    // Coordinates appear after a few gossip rounds.
    let deadline = Instant::now() + WAIT;
    let coord = loop {
        if let Some(coord) = c.get_coordinate("mem-db1").await.unwrap() {
            break coord;
        }
        assert!(Instant::now() < deadline, "no coordinate for mem-db1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(coord.vec.len(), 8);
    assert_eq!(c.get_coordinate("no-such-node").await.unwrap(), None);

    // A second handshake on the same connection is refused with the agent's text.
    let err = c.handshake().await.unwrap_err();
    assert_eq!(err.agent_message(), Some("Handshake already performed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_event_with_binary_payload_crosses_nodes_intact() {
    let cluster = three_nodes("bin");
    let receiver = connect(&cluster[2]).await;
    let mut events = receiver.stream("user:blob").await.unwrap();
    let sender = connect(&cluster[0]).await;
    let payload: Vec<u8> = vec![0xff, 0x00, 0xfe, b'\n', 0x80, b'x', 0xc1];
    sender.event("blob", &payload, false).await.unwrap();
    sender.event("other", b"ignored", false).await.unwrap();
    let ev = wait_event(&mut events, WAIT, |_| true).await;
    let Event::User(u) = ev else { panic!("{ev:?}") };
    assert_eq!(u.name, "blob");
    assert_eq!(u.payload, payload);
    assert!(!u.coalesce);
    // The `other` event does not pass the filter.
    assert!(
        drain(&mut events, Duration::from_millis(800))
            .await
            .is_empty()
    );

    // An empty payload arrives as nil and decodes as empty.
    sender.event("blob", b"", false).await.unwrap();
    let Event::User(u) = wait_event(&mut events, WAIT, |_| true).await else {
        panic!()
    };
    assert!(u.payload.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesce_flag_batches_only_coalesced_events() {
    let cluster = three_nodes("coal");
    let c = connect(&cluster[1]).await;
    let mut events = c.stream("user").await.unwrap();
    for i in 1..=5 {
        c.event("cx", format!("p{i}").as_bytes(), true)
            .await
            .unwrap();
    }
    for i in 1..=5 {
        c.event("nc", format!("p{i}").as_bytes(), false)
            .await
            .unwrap();
    }
    let got = drain(&mut events, Duration::from_secs(5)).await;
    let of = |name: &str| -> Vec<(Vec<u8>, bool)> {
        got.iter()
            .filter_map(|e| match e {
                Event::User(u) if u.name == name => Some((u.payload.clone(), u.coalesce)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(of("cx"), vec![(b"p5".to_vec(), true)], "{got:?}");
    let nc = of("nc");
    assert_eq!(nc.len(), 5, "{got:?}");
    assert!(nc.iter().all(|(_, coalesce)| !coalesce));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_with_filters_and_acks_is_answered_by_another_client() {
    let cluster = three_nodes("qry");
    // A responder on db1 answers `load` queries over its own connection.
    let responder = connect(&cluster[1]).await;
    let mut queries = responder.stream("query:load").await.unwrap();
    let answering = tokio::spawn(async move {
        let ev = wait_event(&mut queries, WAIT, |_| true).await;
        let Event::Query(q) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(q.payload, b"15m");
        let client = queries.client().clone();
        client.respond(q.id, b"load-from-db1: 0.42").await.unwrap();
        // Each node answers once.
        let again = client.respond(q.id, b"twice").await.unwrap_err();
        assert!(
            again
                .agent_message()
                .unwrap()
                .contains("response already sent"),
            "{again}"
        );
        q.ltime
    });

    let asker = connect(&cluster[0]).await;
    let mut params = QueryParams::new("load", b"15m".to_vec());
    params.filter_nodes = vec!["qry-db1".into(), "qry-web".into()];
    params.filter_tags.insert("role".into(), "d".into()); // matches anywhere: db
    params.timeout = Some(Duration::from_secs(2));
    let started = Instant::now();
    let outcome = asker.query(&params).await.unwrap().collect().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert!(outcome.complete);
    assert_eq!(outcome.acks, ["qry-db1"], "{outcome:?}");
    assert_eq!(
        outcome.responses,
        vec![("qry-db1".to_string(), b"load-from-db1: 0.42".to_vec())]
    );
    assert!(answering.await.unwrap() >= 1);

    // Without ack requests no acks come; the stream yields Done and then ends.
    let mut p = QueryParams::new("nobody-answers", Vec::new());
    p.request_ack = false;
    p.timeout = Some(Duration::from_millis(500));
    let mut q = asker.query(&p).await.unwrap();
    assert_eq!(q.next().await.unwrap().unwrap(), QueryRecord::Done);
    assert!(q.next().await.is_none());

    // Refused queries carry the agent's reason.
    let err = asker
        .query(&QueryParams::new("_serf_x", Vec::new()))
        .await
        .unwrap_err();
    assert!(err.agent_message().unwrap().contains("_serf_"), "{err}");
    let err = asker
        .query(&QueryParams::new("big", vec![b'x'; 2000]))
        .await
        .unwrap_err();
    assert!(
        err.agent_message().unwrap().contains("exceeds limit"),
        "{err}"
    );
    let err = asker.respond(999_999, b"x").await.unwrap_err();
    assert_eq!(err.agent_message(), Some("No pending queries matching ID"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_failed_leave_update_and_reap() {
    let mut cluster = Cluster::start(vec![
        AgentConfig::new("lc-obs").tag("role", "observer"),
        AgentConfig::new("lc-victim").tag("role", "db"),
        AgentConfig::new("lc-leaver").tag("role", "cache"),
        AgentConfig::new("lc-tagged").tag("role", "web"),
    ])
    .unwrap();
    let obs = connect(&cluster[0]).await;
    let mut events = obs.stream("member-*").await.unwrap();

    // member-update after a tag change on another node.
    let tagged = connect(&cluster[3]).await;
    let mut set = BTreeMap::new();
    set.insert("ver".to_string(), "2".to_string());
    tagged.tags(&set, &["role".to_string()]).await.unwrap();
    let ev = wait_event(
        &mut events,
        WAIT,
        |e| matches!(e, Event::Member(m) if m.kind == MemberEventKind::Update),
    )
    .await;
    let Event::Member(m) = ev else { panic!() };
    assert_eq!(m.members[0].name, "lc-tagged");
    assert_eq!(m.members[0].tags.get("ver").map(String::as_str), Some("2"));
    assert!(!m.members[0].tags.contains_key("role"));

    // member-failed after kill -9.
    cluster[1].kill().unwrap();
    let ev = wait_event(
        &mut events,
        Duration::from_secs(40),
        |e| matches!(e, Event::Member(m) if m.kind == MemberEventKind::Failed),
    )
    .await;
    let Event::Member(m) = ev else { panic!() };
    assert_eq!(m.members[0].name, "lc-victim");
    assert_eq!(m.members[0].status, MemberStatus::Failed);

    // force-leave then reap (prune).
    obs.force_leave("lc-victim", false).await.unwrap();
    let ev = wait_event(
        &mut events,
        WAIT,
        |e| matches!(e, Event::Member(m) if m.kind == MemberEventKind::Leave),
    )
    .await;
    let Event::Member(m) = ev else { panic!() };
    assert_eq!(m.members[0].name, "lc-victim");
    assert_eq!(m.members[0].status, MemberStatus::Left);
    obs.force_leave("lc-victim", true).await.unwrap();
    wait_event(&mut events, WAIT, |e| {
        matches!(e, Event::Member(m) if m.kind == MemberEventKind::Reap && m.members[0].name == "lc-victim")
    })
    .await;
    assert!(
        !obs.members()
            .await
            .unwrap()
            .iter()
            .any(|m| m.name == "lc-victim")
    );
    // An unknown node is not an error.
    obs.force_leave("no-such-node", false).await.unwrap();

    // member-leave after a graceful leave; the leaving agent shuts down.
    let leaver = connect(&cluster[2]).await;
    leaver.leave().await.unwrap();
    let ev = wait_event(
        &mut events,
        WAIT,
        |e| matches!(e, Event::Member(m) if m.kind == MemberEventKind::Leave),
    )
    .await;
    let Event::Member(m) = ev else { panic!() };
    assert_eq!(m.members[0].name, "lc-leaver");
    assert_eq!(m.members[0].status, MemberStatus::Left);
    let deadline = Instant::now() + WAIT;
    while cluster[2].is_running() {
        assert!(Instant::now() < deadline, "agent did not exit after leave");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_reports_count_and_failure_body() {
    let a = Agent::start(AgentConfig::new("join-a"), &[]).unwrap();
    let b = Agent::start(AgentConfig::new("join-b"), &[]).unwrap();
    let c = connect(&a).await;
    assert_eq!(c.members().await.unwrap().len(), 1);
    let n = c.join(&[b.bind_addr().to_string()], false).await.unwrap();
    assert_eq!(n, 1);
    a.wait_for(WAIT, "join-b alive", |ms| {
        ms.iter().any(|m| m.name == "join-b")
    })
    .unwrap();

    // The join error arrives with a body; the connection stays usable.
    let dead = format!("127.0.0.1:{}", serf_testkit::free_port().unwrap());
    let err = c.join(&[dead], false).await.unwrap_err();
    match &err {
        Error::Agent {
            command,
            message,
            body,
        } => {
            assert_eq!(*command, "join");
            assert!(message.contains("Failed to join"), "{message}");
            assert_eq!(body.as_deref(), Some(&ErrorBody::Join { num: 0 }));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.members().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_commands_on_an_encrypted_cluster() {
    let key1 = serf_testkit::keygen().unwrap();
    let key2 = serf_testkit::keygen().unwrap();
    let cluster = Cluster::start(vec![
        AgentConfig::new("enc-a").encrypt(&key1),
        AgentConfig::new("enc-b").encrypt(&key1),
    ])
    .unwrap();
    let c = connect(&cluster[0]).await;
    assert_eq!(c.stats().await.unwrap()["serf"]["encrypted"], "true");

    let keys = c.list_keys().await.unwrap();
    assert_eq!(keys.keys.get(&key1), Some(&2));
    assert_eq!(keys.num_nodes, 2);

    let r = c.install_key(&key2).await.unwrap();
    assert_eq!((r.num_nodes, r.num_resp, r.num_err), (2, 2, 0));
    assert_eq!(c.list_keys().await.unwrap().keys.get(&key2), Some(&2));
    c.use_key(&key2).await.unwrap();

    // Removing the primary key fails on every node; the body carries each node's message.
    let err = c.remove_key(&key2).await.unwrap_err();
    match &err {
        Error::Agent {
            command,
            message,
            body: Some(body),
        } => {
            assert_eq!(*command, "remove-key");
            assert_eq!(message, "2/2 nodes reported failure");
            let ErrorBody::Keys(k) = body.as_ref() else {
                panic!("{body:?}")
            };
            assert_eq!(k.num_err, 2);
            assert!(
                k.messages
                    .values()
                    .all(|m| m.contains("Removing the primary key is not allowed")),
                "{k:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    c.remove_key(&key1).await.unwrap();
    let keys = c.list_keys().await.unwrap();
    assert_eq!(keys.keys.len(), 1);
    assert_eq!(keys.keys.get(&key2), Some(&2));

    let err = c.install_key("not-base64!").await.unwrap_err();
    assert!(
        err.agent_message().unwrap().contains("illegal base64"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_success_and_failure() {
    let agent = Agent::start(AgentConfig::new("auth-a").rpc_auth("s3cret"), &[]).unwrap();
    let good = connect(&agent).await;
    assert_eq!(good.members().await.unwrap().len(), 1);

    let addr = agent.rpc_addr().to_string();
    let err = Client::connect(ClientConfig::new(&addr).with_auth("wrong"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Auth(m) if m == "Invalid authentication token"),
        "{err:?}"
    );

    // Without a key the handshake works and the first command is refused; the connection is
    // then closed by the client (the agent would answer the refused request twice).
    let anon = Client::connect(ClientConfig::new(&addr)).await.unwrap();
    let err = anon.members().await.unwrap_err();
    assert!(
        matches!(&err, Error::Auth(m) if m == "Authentication required"),
        "{err:?}"
    );
    assert!(anon.is_closed());
    assert!(anon.members().await.unwrap_err().is_connection_error());
    // The authenticated connection is unaffected.
    assert_eq!(good.members().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_streams_log_lines_and_stop_ends_streams() {
    let agent = Agent::start(AgentConfig::new("mon-a"), &[]).unwrap();
    let c = connect(&agent).await;
    let mut logs = c.monitor("debug").await.unwrap();
    // The backlog replays the start-up lines.
    let deadline = Instant::now() + WAIT;
    loop {
        let line = tokio::time::timeout(WAIT, logs.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!line.ends_with('\n'));
        if line.contains("serf: EventMemberJoin: mon-a") {
            break;
        }
        assert!(Instant::now() < deadline, "no join line in the backlog");
    }
    // Only one monitor per connection.
    let err = c.monitor("info").await.unwrap_err();
    assert_eq!(err.agent_message(), Some("Monitor already exists"));
    let err = c.monitor("loud").await.err();
    assert!(err.is_some());
    logs.stop().await.unwrap();
    // After stop a monitor can be opened again on the same connection.
    let mut again = c.monitor("LOUD").await.err().map(|e| e.to_string());
    assert!(again.take().unwrap().contains("Unknown log level"));
    let mut logs = c.monitor("info").await.unwrap();
    assert!(
        tokio::time::timeout(WAIT, logs.next())
            .await
            .unwrap()
            .is_some()
    );

    // A stopped event stream: later events are read and dropped, the connection stays fine.
    let events = c.stream("user").await.unwrap();
    events.stop().await.unwrap();
    c.event("after-stop", b"x", false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.members().await.unwrap().len(), 1);

    // An invalid filter is refused before it reaches the agent.
    let err = c.stream("bogus").await.err().unwrap();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_calls_on_one_connection() {
    let agent = Agent::start(AgentConfig::new("conc-a").tag("role", "web"), &[]).unwrap();
    let c = connect(&agent).await;
    let mut events = c.stream("user:conc").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            match i % 4 {
                0 => c.members().await.map(|m| assert_eq!(m.len(), 1)),
                1 => c
                    .stats()
                    .await
                    .map(|s| assert_eq!(s["agent"]["name"], "conc-a")),
                2 => c.event("conc", i.to_string().as_bytes(), false).await,
                _ => c.get_coordinate("conc-a").await.map(|_| ()),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut payloads: Vec<u32> = drain(&mut events, Duration::from_secs(2))
        .await
        .into_iter()
        .map(|e| match e {
            Event::User(u) => String::from_utf8(u.payload).unwrap().parse().unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    payloads.sort();
    assert_eq!(
        payloads,
        (0..100).filter(|i| i % 4 == 2).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_stream_fails_everything_promptly() {
    let mut agent = Agent::start(AgentConfig::new("kill-a"), &[]).unwrap();
    let c = connect(&agent).await;
    let mut events = c.stream("*").await.unwrap();
    let mut logs = c.monitor("info").await.unwrap();
    c.event("before", b"1", false).await.unwrap();
    wait_event(&mut events, WAIT, |e| e.kind() == "user").await;
    // A query in flight when the agent dies.
    let mut p = QueryParams::new("q", Vec::new());
    p.timeout = Some(Duration::from_secs(30));
    let query = c.query(&p).await.unwrap();

    agent.kill().unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match events.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return e,
                None => panic!("stream ended without an error"),
            }
        }
    })
    .await
    .expect("the stream must fail within a second");
    assert!(matches!(err, Error::ConnectionClosed { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(events.next().await.is_none());
    let q = tokio::time::timeout(Duration::from_secs(1), query.collect())
        .await
        .unwrap();
    assert!(q.unwrap_err().is_connection_error());
    let drained = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = logs.next().await {}
    })
    .await;
    assert!(drained.is_ok());
    let err = c.members().await.unwrap_err();
    assert!(matches!(err, Error::ConnectionClosed { .. }), "{err:?}");
}

async fn next_item(sub: &mut Subscription) -> SubscriptionItem {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("subscription item")
        .expect("subscription open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_survives_agent_restart() {
    let mut agent = Agent::start(AgentConfig::new("sub-a"), &[]).unwrap();
    let mut cfg = SubscriptionConfig::new(config(&agent), "user");
    cfg.max_backoff = Duration::from_millis(500);
    let mut sub = Subscription::start(cfg).unwrap();
    let mut state = sub.watch_state();

    let SubscriptionItem::Connected { client, epoch } = next_item(&mut sub).await else {
        panic!("expected Connected first")
    };
    assert_eq!(epoch, 1);
    assert!(sub.state().is_connected());
    client.event("one", b"1", false).await.unwrap();
    let SubscriptionItem::Event(Event::User(u)) = next_item(&mut sub).await else {
        panic!()
    };
    assert_eq!(u.name, "one");
    drop(client);

    agent.kill().unwrap();
    let SubscriptionItem::Disconnected { error } = next_item(&mut sub).await else {
        panic!("expected Disconnected")
    };
    assert!(error.is_connection_error(), "{error}");
    state
        .wait_for(|s| matches!(s, ConnectionState::Disconnected { .. }))
        .await
        .unwrap();

    agent.restart(&[]).unwrap();
    let SubscriptionItem::Connected { client, epoch } = next_item(&mut sub).await else {
        panic!("expected Connected after restart")
    };
    assert_eq!(epoch, 2);
    client.event("two", b"2", false).await.unwrap();
    let SubscriptionItem::Event(Event::User(u)) = next_item(&mut sub).await else {
        panic!()
    };
    assert_eq!(u.name, "two");
    assert_eq!(sub.state(), ConnectionState::Connected { epoch: 2 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_errors_keep_the_connection_usable() {
    let agent = Agent::start(AgentConfig::new("err-a"), &[]).unwrap();
    let c = connect(&agent).await;
    let err = c.event("big", &[b'x'; 600], false).await.unwrap_err();
    assert!(
        err.agent_message()
            .unwrap()
            .contains("exceeds configured limit"),
        "{err}"
    );
    let err = c.event("huge", &[b'x'; 10_000], false).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert_eq!(c.members().await.unwrap().len(), 1);
    let nothing = Client::connect(
        ClientConfig::new(format!("127.0.0.1:{}", serf_testkit::free_port().unwrap()))
            .with_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(matches!(nothing, Error::Io(_)), "{nothing:?}");
    assert!(nothing.to_string().contains("cannot connect"), "{nothing}");
}
