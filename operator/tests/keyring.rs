//! Gossip key rotation against real Serf agents: an encrypted cluster of four with keyring
//! files, one member killed during the rotation, the operator "restarted" between steps (a
//! new rotation engine on the recorded state, one step recorded and not done), and the
//! agents' keyring files afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serf_client::ClientConfig;
use serf_operator::keyring::plan::{self, Action};
use serf_operator::keyring::rotate::{MemoryStore, RecordStore, Rotator};
use serf_operator::keyring::{Key, Keyring};
use serf_testkit::{AgentConfig, Cluster, keygen};

const NOW: &str = "2026-12-03T00:00:00Z";

fn now() -> String {
    NOW.to_string()
}

async fn rotator(addr: std::net::SocketAddr, store: MemoryStore) -> Rotator<MemoryStore> {
    let c = serf_client::Client::connect(ClientConfig::new(addr.to_string()))
        .await
        .unwrap();
    Rotator::new(c, store)
}

fn ring(primary: &str, others: &[&str]) -> Keyring {
    Keyring {
        primary: Key::parse(primary).unwrap(),
        others: others.iter().map(|k| Key::parse(k).unwrap()).collect(),
    }
}

/// Steps until in sync (waits while a step must wait), at most `within`.
async fn until_in_sync(
    r: &Rotator<MemoryStore>,
    desired: &Keyring,
    within: Duration,
) -> Vec<serf_operator::keyring::rotate::Outcome> {
    let deadline = Instant::now() + within;
    let mut all = Vec::new();
    loop {
        let o = r.step(desired, NOW).await.unwrap();
        let done = o.action == Action::InSync;
        let wait = matches!(o.action, Action::Wait(_));
        all.push(o);
        if done {
            return all;
        }
        assert!(Instant::now() < deadline, "not in sync: {:#?}", all.last());
        if wait {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The first step that acts (a step that must wait is taken again a moment later).
async fn acting_step(
    r: &Rotator<MemoryStore>,
    desired: &Keyring,
) -> serf_operator::keyring::rotate::Outcome {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = r.step(desired, NOW).await.unwrap();
        if !matches!(o.action, Action::Wait(_)) {
            return o;
        }
        assert!(Instant::now() < deadline, "still waiting: {o:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_survives_a_member_killed_and_an_operator_restart_between_steps() {
    let (old, new) = (keygen().unwrap(), keygen().unwrap());
    let cfgs = (1..=4)
        .map(|i| AgentConfig::new(format!("krot-{i}")).keyring([old.clone()]))
        .collect();
    let mut cluster = tokio::task::spawn_blocking(move || Cluster::start(cfgs).unwrap())
        .await
        .unwrap();
    let addr = cluster[0].rpc_addr();
    let store = MemoryStore::default();

    // The cluster as it is: the Secret's one key, nothing to do.
    // (A member that joined a moment ago may not answer list-keys yet: that is a wait.)
    let first = rotator(addr, store.clone()).await;
    until_in_sync(&first, &ring(&old, &[]), Duration::from_secs(10)).await;
    assert_eq!(store.record().rotations, 0);
    assert_eq!(store.record().members_alive, 4);

    // The Secret gets a new primary: the first step installs it on all four.
    let desired = ring(&new, &[]);
    let o = acting_step(&first, &desired).await;
    assert_eq!(o.action, Action::Install(desired.primary.clone()));
    assert!(
        o.notes.iter().any(|n| n.reason == "KeyInstalled"),
        "{:?}",
        o.notes
    );
    let rec = store.record();
    let rot = rec.rotation.clone().unwrap();
    assert_eq!(rot.id, 1);
    for a in cluster.iter() {
        assert_eq!(
            sorted(a.keyring().unwrap()),
            sorted(vec![old.clone(), new.clone()])
        );
    }

    // The operator stops, having recorded the next step (use) without doing it. A member's
    // list-keys answer can miss one query's deadline on a loaded machine (the plan then
    // waits, as it must): asked again until all four answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    let p = loop {
        let obs = first.observe().await.unwrap();
        let p = plan::next(&desired, &store.record(), &obs, NOW);
        match &p.action {
            Action::Wait(why) if Instant::now() < deadline => {
                eprintln!("waiting: {why}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => break p,
        }
    };
    assert_eq!(p.action, Action::Use(desired.primary.clone()));
    let (_, version) = store.load().await.unwrap();
    store
        .save(&p.record, &BTreeMap::new(), version.as_deref())
        .await
        .unwrap();
    drop(first);

    // Meanwhile a member dies.
    let killed = cluster[3].name().to_string();
    cluster[3].kill().unwrap();

    // The next run (a new engine, a new connection) carries on from the record: it waits
    // while the dead member is still counted, then uses and removes without it.
    let second = rotator(addr, store.clone()).await;
    let outcomes = until_in_sync(&second, &desired, Duration::from_secs(30)).await;
    // (A use-key that a member dying at that moment did not answer leaves the primary
    // unconfirmed and is done again: consecutive repeats are folded.)
    let mut actions: Vec<&Action> = outcomes
        .iter()
        .map(|o| &o.action)
        .filter(|a| !matches!(a, Action::Wait(_)))
        .collect();
    actions.dedup();
    assert_eq!(
        actions,
        [
            &Action::Use(desired.primary.clone()),
            &Action::Remove {
                primary: desired.primary.clone(),
                key: old.clone()
            },
            &Action::InSync
        ],
        "{outcomes:#?}"
    );
    let ended: Vec<_> = outcomes.iter().flat_map(|o| o.ended.clone()).collect();
    assert_eq!(ended.len(), 1, "counted once");
    let last = store.record().last.unwrap();
    assert_eq!((last.id, last.result.as_str()), (1, "Succeeded"));
    assert!(last.unreachable.contains(&killed), "{last:?}");
    assert_eq!(last.removed, [Key::parse(&old).unwrap().fingerprint()]);
    let notes: Vec<_> = outcomes.iter().flat_map(|o| o.notes.clone()).collect();
    let unreachable = notes
        .iter()
        .find(|n| n.reason == "KeyRotationMembersUnreachable")
        .expect("the dead member is reported");
    assert!(unreachable.warning && unreachable.message.contains(&killed));
    assert!(notes.iter().any(|n| n.reason == "KeyRotationFinished"));
    let status = store.status();
    assert_eq!(status["step"], "InSync");
    assert!(status["lastRotation"].contains(&killed), "{status:?}");

    // Every alive agent's keyring file holds the new key only (the agents wrote it).
    for a in cluster.iter().take(3) {
        assert_eq!(
            a.keyring().unwrap(),
            std::slice::from_ref(&new),
            "{}",
            a.name()
        );
    }
    // The dead member's file still has the old primary: as reported, it needs the new one.
    let dead = cluster[3].keyring().unwrap();
    assert_eq!(dead[0], old);

    // Nothing more to do, and nothing counted again, on another run.
    let third = rotator(addr, store.clone()).await;
    let o = third.run(&desired, 5, now).await.unwrap();
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].action, Action::InSync);
    assert!(o[0].ended.is_empty() && o[0].notes.is_empty());

    // Given what the report says it needs, the dead member rejoins.
    std::fs::write(
        cluster[3].keyring_file_path(),
        serde_json::to_string(std::slice::from_ref(&new)).unwrap(),
    )
    .unwrap();
    let seed = cluster[0].bind_addr();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster[3].restart(&[seed]).unwrap();
        cluster.wait_converged(Duration::from_secs(20)).unwrap();
        cluster
    })
    .await
    .unwrap();
    // Asked until all four answer (one answer can miss a query's deadline under load).
    let deadline = Instant::now() + Duration::from_secs(20);
    let o = loop {
        let o = third.observe().await.unwrap();
        if (o.num_nodes == 4 && o.keys.get(&new) == Some(&4)) || Instant::now() > deadline {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(o.num_nodes, 4);
    assert_eq!(o.keys.get(&new), Some(&4));
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unencrypted_cluster_is_left_alone_with_the_reason_shown() {
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(vec![
            AgentConfig::new("kplain-1"),
            AgentConfig::new("kplain-2"),
        ])
        .unwrap()
    })
    .await
    .unwrap();
    let store = MemoryStore::default();
    let r = rotator(cluster[0].rpc_addr(), store.clone()).await;
    let o = r.step(&ring(&keygen().unwrap(), &[]), NOW).await.unwrap();
    assert!(
        matches!(&o.action, Action::Wait(w) if w.contains("encryption not enabled")),
        "{:?}",
        o.action
    );
    assert!(store.status()["step"].starts_with("Waiting:"));
    assert_eq!(store.record().rotation, None);
}
