//! CPU hotplug seen through the fixture tree: the daemon rescans `--sysfs-root` every 50 ms, so
//! rewriting the tree the way the kernel rewrites sysfs (online mask, the CPU's `topology/` and
//! `cache/` gone, sibling and node lists shrunk) is a CPU going away.
//!
//! On `two-socket`, CPU 3's SMT sibling is CPU 11; `cpus:2-3` keeps CPU 2 when 3 leaves.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_stream::StreamExt;
use wqd_client::proto::{self, FallbackLevel, FallbackPolicy, ItemState, Placement};
use wqd_client::{Batch, Client, FlushScope, Item};
use wqd_e2e::{parse_cpulist, stats, wait_for, wait_states, wq_attrs, Daemon};

const LONG: Duration = Duration::from_secs(30);

/// Waits until the daemon's topology says `cpu` is (not) live; returns that snapshot.
async fn wait_live(c: &Client, cpu: u32, live: bool) -> proto::TopologySnapshot {
    wait_for(
        &format!(
            "the daemon to see cpu {cpu} {}",
            if live { "live" } else { "gone" }
        ),
        LONG,
        || async {
            let t = c.topology().await.expect("GetTopology");
            (parse_cpulist(&t.live).contains(&cpu) == live).then_some(t)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_lost_with_pending_items_rebinds_and_falls_back() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    // Ordered: everything waits behind the first item, so the noops are pending when CPU 3
    // leaves. Spread placement would put half of the cpus:2-3 items on CPU 3 if it stayed.
    c.create_workqueue(proto::WorkqueueAttrs {
        ordered: true,
        placement: Placement::Spread as i32,
        fallback: FallbackPolicy::Widen as i32,
        ..wq_attrs("hot")
    })
    .await
    .expect("create");
    let r = c
        .submit(
            Batch::new()
                .workqueue("hot")
                .item(Item::new("cpu:3", "sleep").arg("ms", "1000"))
                .item(Item::new("cpus:2-3", "sleep").arg("ms", "300"))
                .items((0..4).map(|_| Item::new("cpu:3", "noop")))
                .items((0..4).map(|_| Item::new("cpus:2-3", "noop"))),
        )
        .await
        .expect("Submit");
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    wait_states(&c, &ids[..1], ItemState::Running, LONG).await;
    let before = c.topology().await.expect("GetTopology").epoch;

    d.fixture().set_offline(3);
    let after = wait_live(&c, 3, false).await;
    assert!(after.epoch > before, "a change makes a new epoch");
    assert!(!parse_cpulist(&after.online).contains(&3));
    let cpu3 = &after.cpus[3];
    assert!(!cpu3.online && !cpu3.live, "{cpu3:?}");
    // Membership is remembered: core:3 still lists 3, but only 11 is live.
    let core3 = after
        .groups
        .iter()
        .find(|g| g.target == "core:3")
        .expect("core:3 listed");
    assert_eq!(
        (core3.members.as_str(), core3.live_members.as_str()),
        ("3,11", "11")
    );
    // The premise: the noops had not started when the daemon saw CPU 3 go.
    assert_eq!(
        wqd_e2e::states(&c, &ids[2..]).await,
        vec![ItemState::Pending; 8],
        "the noops must still be pending when CPU 3 leaves (the blocker finished too early?)"
    );

    let (results, summary) = c
        .clone()
        .with_timeout(Some(LONG))
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .expect("the flush completes after the CPU is gone");
    assert_eq!(summary.items_covered, 10);
    assert_eq!(summary.counts.unwrap().ok, 10, "{results:#?}");
    let by_id = |id: u64| results.iter().find(|x| x.item_id == id).unwrap();

    let blocker = by_id(ids[0]);
    assert_eq!(blocker.cpu_started, Some(3));
    for &id in &ids[2..6] {
        let x = by_id(id);
        assert_eq!(x.target, "cpu:3");
        assert_eq!(x.cpu_started, Some(11), "cpu:3 widened to its core: {x:?}");
        assert_eq!(x.fallback_level(), FallbackLevel::Core, "{x:?}");
        assert!(
            x.fallback_reason.contains("cpu:3"),
            "the reason names the target: {:?}",
            x.fallback_reason
        );
        assert!(x.topology_epoch >= after.epoch, "{x:?}");
    }
    for &id in ids[1..2].iter().chain(&ids[6..]) {
        let x = by_id(id);
        assert_eq!(x.target, "cpus:2-3");
        assert_eq!(x.cpu_started, Some(2), "cpus:2-3 keeps CPU 2: {x:?}");
        assert_eq!(x.fallback_level(), FallbackLevel::Unspecified, "{x:?}");
        assert!(x.fallback_reason.is_empty(), "{x:?}");
    }
    let s = stats(&c).await;
    assert!(s.fallbacks >= 4, "stats count the fallbacks: {s:?}");
    assert_eq!(s.topology_epoch, after.epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_fallback_holds_items_until_the_cpu_returns() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    c.create_workqueue(proto::WorkqueueAttrs {
        fallback: FallbackPolicy::Wait as i32,
        ..wq_attrs("w")
    })
    .await
    .expect("create");
    c.create_workqueue(proto::WorkqueueAttrs {
        fallback: FallbackPolicy::Reject as i32,
        ..wq_attrs("rj")
    })
    .await
    .expect("create");
    d.fixture().set_offline(6);
    wait_live(&c, 6, false).await;

    let r = c
        .submit(
            Batch::new()
                .workqueue("w")
                .items((0..3).map(|_| Item::new("cpu:6", "noop"))),
        )
        .await
        .expect("Submit");
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    let l = c.results(ids.clone()).await.expect("GetResults");
    for x in &l.items {
        let res = x.result.as_ref().unwrap();
        assert_eq!(res.state(), ItemState::Pending, "{res:?}");
    }
    // Reject: accepted, then REJECTED with the reason.
    let rj = c
        .submit(
            Batch::new()
                .workqueue("rj")
                .item(Item::new("cpu:6", "noop"))
                .wait(true),
        )
        .await
        .expect("Submit rj");
    assert_eq!(rj.results[0].state(), ItemState::Rejected);
    assert!(!rj.results[0].error.is_empty(), "{:?}", rj.results[0]);
    assert_eq!(rj.results[0].cpu_started, None);

    d.fixture().set_online(6);
    let (results, summary) = c
        .clone()
        .with_timeout(Some(LONG))
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .expect("flush once the CPU is back");
    assert_eq!(summary.counts.unwrap().ok, 3);
    for x in &results {
        assert_eq!(x.cpu_started, Some(6), "{x:?}");
        assert_eq!(x.fallback_level(), FallbackLevel::Unspecified);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_topology_streams_a_new_epoch_per_change() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let mut w = c.watch_topology().await.expect("WatchTopology");
    let first = tokio::time::timeout(LONG, w.next())
        .await
        .expect("the current snapshot comes first")
        .expect("stream open")
        .expect("snapshot");
    assert_eq!(first.live, "0-13");

    // Next snapshot after a change: epochs may be skipped, the latest state always arrives.
    async fn until(
        w: &mut wqd_client::EventStream<proto::TopologySnapshot>,
        what: &str,
        f: impl Fn(&proto::TopologySnapshot) -> bool,
    ) -> proto::TopologySnapshot {
        let fut = async {
            loop {
                let t = w
                    .next()
                    .await
                    .expect("watch stream ended")
                    .expect("watch error");
                if f(&t) {
                    return t;
                }
            }
        };
        tokio::time::timeout(LONG, fut)
            .await
            .unwrap_or_else(|_| panic!("no snapshot with {what} within {LONG:?}"))
    }

    d.fixture().set_offline(5);
    let gone = until(&mut w, "cpu 5 gone", |t| {
        !parse_cpulist(&t.live).contains(&5)
    })
    .await;
    assert!(gone.epoch > first.epoch);
    assert_eq!(gone.online, "0-4,6-15");
    assert_eq!(gone.live, "0-4,6-13");
    let node0 = gone.groups.iter().find(|g| g.target == "node:0").unwrap();
    assert_eq!(node0.live_members, "0-3,8-11");

    d.fixture().set_online(5);
    let back = until(&mut w, "cpu 5 back", |t| {
        parse_cpulist(&t.live).contains(&5)
    })
    .await;
    assert!(back.epoch > gone.epoch);
    assert_eq!(back.live, "0-13");

    // Un-isolating CPU 15 makes it live (a change that is not hotplug).
    wqd_e2e::write(
        &d.fixture().root().join("devices/system/cpu/isolated"),
        "14\n",
    );
    let iso = until(&mut w, "cpu 15 live", |t| {
        parse_cpulist(&t.live).contains(&15)
    })
    .await;
    assert!(iso.epoch > back.epoch);
    assert_eq!(iso.isolated, "14");
    let live: BTreeSet<u32> = parse_cpulist(&iso.live);
    assert_eq!(live, (0..14).chain([15]).collect());
    // GetTopology agrees with the stream.
    assert!(c.topology().await.expect("GetTopology").epoch >= iso.epoch);
}
