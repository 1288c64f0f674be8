//! `each:` fan-outs end to end on the `two-socket` fixture (16 CPUs, four LLCs of two cores:
//! LLC l holds CPUs 2l, 2l+1, 2l+8, 2l+9; CPUs 14-15 isolated): one submitted item becomes one
//! item per group in one batch, groups with no live CPU included, and wqctl reports per group.

use std::time::Duration;

use wqd_client::proto::{self, FallbackLevel, FallbackPolicy, ItemState};
use wqd_client::{Batch, Client, FlushScope, Item, Target};
use wqd_e2e::{parse_cpulist, wait_for, wq_attrs, Daemon};

const LONG: Duration = Duration::from_secs(30);

/// The CPUs of LLC `l` on `two-socket`.
fn llc(l: u32) -> [u32; 4] {
    [2 * l, 2 * l + 1, 2 * l + 8, 2 * l + 9]
}

/// Takes LLC 3's online, non-isolated CPUs (6 and 7; 14-15 are isolated) offline and waits
/// until the daemon sees it, so `cache:3` has no live CPU.
async fn empty_llc3(d: &Daemon, c: &Client) {
    d.fixture().set_offline(6);
    d.fixture().set_offline(7);
    wait_for("the daemon to see CPUs 6-7 gone", LONG, || async {
        let t = c.topology().await.expect("GetTopology");
        let live = parse_cpulist(&t.live);
        (!live.contains(&6) && !live.contains(&7)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cache_is_one_item_per_llc_in_one_batch_that_one_flush_covers() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    empty_llc3(&d, &c).await;
    let r = c
        .submit(
            Batch::new().item(
                Item::new(Target::each("cache"), "spin")
                    .arg("ms", "1")
                    .key("per-llc"),
            ),
        )
        .await
        .expect("Submit");
    assert_eq!(r.items.len(), 4, "one receipt per LLC: {r:?}");
    let groups: Vec<&str> = r.items.iter().map(|x| x.target.as_str()).collect();
    assert_eq!(groups, ["cache:0", "cache:1", "cache:2", "cache:3"]);
    assert!(r
        .items
        .iter()
        .all(|x| x.queued && x.source_index == Some(0)));
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");

    // One flush of the batch covers every group, the one with no live CPU too.
    let (results, summary) = c
        .clone()
        .with_timeout(Some(LONG))
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .expect("Flush");
    assert_eq!(summary.items_covered, 4);
    assert_eq!(summary.counts.expect("counts").ok, 4, "{results:#?}");
    for (l, id) in ids.iter().enumerate() {
        let x = results
            .iter()
            .find(|x| x.item_id == *id)
            .expect("a result per item");
        assert_eq!(x.target, format!("cache:{l}"));
        assert_eq!(x.state(), ItemState::Ok);
        let cpu = x.cpu_started.expect("started");
        if l < 3 {
            assert!(llc(l as u32).contains(&cpu), "{x:?}");
            assert_eq!(x.fallback_level(), FallbackLevel::Unspecified, "{x:?}");
        } else {
            // LLC 3 has no live CPU: the default queue widens to its node (CPUs 4-7, 12-15;
            // 4, 5, 12 and 13 are live) and records it.
            assert_eq!(x.fallback_level(), FallbackLevel::Node, "{x:?}");
            assert!([4, 5, 12, 13].contains(&cpu), "{x:?}");
            assert!(x.fallback_reason.contains("cache:3"), "{x:?}");
        }
    }

    // Keys get the group (K/cache:N): a second fan-out with the same key in the same batch
    // merges group by group into the first one's items, never across groups.
    let again = c
        .submit(
            Batch::new()
                .item(Item::new("each:cache", "sleep").arg("ms", "300").key("k"))
                .item(Item::new("each:cache", "noop").key("k"))
                .wait(true),
        )
        .await
        .expect("Submit with keys");
    assert_eq!(again.items.len(), 8);
    for (i, x) in again.items.iter().enumerate() {
        assert_eq!(x.target, format!("cache:{}", i % 4));
        assert_eq!(x.source_index, Some((i / 4) as u64));
        if i < 4 {
            assert!(x.queued, "{x:?}");
        } else {
            // Same key and group as the pending sleep of item i - 4: merged into it.
            assert!(!x.queued, "{x:?}");
            assert_eq!(x.duplicate_of, again.items[i - 4].item_id);
        }
    }
    assert_eq!(again.results.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_policies_apply_to_the_group_with_no_live_cpu() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    for (name, f) in [
        ("rej", FallbackPolicy::Reject),
        ("wait", FallbackPolicy::Wait),
    ] {
        c.create_workqueue(proto::WorkqueueAttrs {
            fallback: f as i32,
            ..wq_attrs(name)
        })
        .await
        .expect("create");
    }
    empty_llc3(&d, &c).await;

    let r = c
        .submit(
            Batch::new()
                .workqueue("rej")
                .item(Item::new("each:cache", "noop"))
                .wait(true),
        )
        .await
        .expect("Submit");
    let states: Vec<(String, ItemState)> = r
        .results
        .iter()
        .map(|x| (x.target.clone(), x.state()))
        .collect();
    assert_eq!(
        states,
        [
            ("cache:0".to_string(), ItemState::Ok),
            ("cache:1".to_string(), ItemState::Ok),
            ("cache:2".to_string(), ItemState::Ok),
            ("cache:3".to_string(), ItemState::Rejected),
        ]
    );

    // wait: cache:3's item waits until a CPU of LLC 3 comes back; the batch's flush covers it.
    let r = c
        .submit(
            Batch::new()
                .workqueue("wait")
                .item(Item::new("each:cache", "noop")),
        )
        .await
        .expect("Submit");
    let waiting = r.items[3].item_id;
    wait_for("the other LLCs' items to finish", LONG, || async {
        let s = wqd_e2e::states(&c, &[r.items[0].item_id, r.items[2].item_id]).await;
        s.iter().all(|s| *s == ItemState::Ok).then_some(())
    })
    .await;
    assert_eq!(
        wqd_e2e::states(&c, &[waiting]).await,
        [ItemState::Pending],
        "cache:3 waits for a live CPU"
    );
    d.fixture().set_online(7);
    let (results, summary) = c
        .clone()
        .with_timeout(Some(LONG))
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .expect("Flush");
    assert_eq!(summary.items_covered, 4);
    assert_eq!(summary.counts.expect("counts").ok, 4, "{results:#?}");
    let x = results
        .iter()
        .find(|x| x.item_id == waiting)
        .expect("result");
    assert_eq!(x.cpu_started, Some(7), "{x:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_from_config_and_refusals() {
    let d = Daemon::builder("two-socket")
        .config(
            "[[partition]]\nname = \"rcu\"\ncpus = \"0-15\"\nsize = 4\n\
             [[group]]\nname = \"db\"\ncpus = \"0-3\"\n",
        )
        .start();
    let c = d.client().await;
    let r = c
        .submit(
            Batch::new()
                .item(Item::new("all", "noop"))
                .item(Item::new(" each:rcu ", "noop"))
                .wait(true),
        )
        .await
        .expect("Submit");
    let targets: Vec<&str> = r.results.iter().map(|x| x.target.as_str()).collect();
    assert_eq!(targets, ["all", "rcu:0", "rcu:1", "rcu:2", "rcu:3"]);
    assert_eq!(r.items[0].target, "", "a plain item's receipt has no group");
    assert_eq!(r.items[0].source_index, None);
    assert!(r.items[1..].iter().all(|x| x.source_index == Some(1)));
    for (k, x) in r.results[1..].iter().enumerate() {
        let cpu = x.cpu_started.expect("started");
        // rcu:3 = 12-15: 14-15 are isolated, so it runs on 12 or 13.
        assert!((4 * k as u32..4 * k as u32 + 4).contains(&cpu), "{x:?}");
    }

    // Refusals: INVALID_ARGUMENT, naming the item the client sent; nothing is queued.
    let refused = |items: Vec<Item>| {
        let c = c.clone();
        async move {
            let e = c
                .submit(Batch::new().items(items))
                .await
                .expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
            e.status().expect("a status").message().to_string()
        }
    };
    let m = refused(vec![Item::new("all", "noop"), Item::new("each:db", "noop")]).await;
    assert!(
        m.starts_with("items[1].target: each:db: \"db\" is a named group, not a partition"),
        "{m}"
    );
    let m = refused(vec![Item::new("each:all", "noop")]).await;
    assert!(m.contains("\"all\" is one group"), "{m}");
    let m = refused(vec![Item::new("each:cpus:0-3", "noop")]).await;
    assert!(m.contains("a cpulist is one group"), "{m}");
    let m = refused(vec![Item::new("each:nope", "noop")]).await;
    assert!(
        m.starts_with("items[0].target: each:nope: unknown group name"),
        "{m}"
    );
    let m = refused(vec![
        Item::new("all", "noop"),
        Item::new("each:cache", "no-such-handler"),
    ])
    .await;
    assert!(m.starts_with("items[1].handler: unknown handler"), "{m}");
    // A bad argument is the same for every copy: the error names the item sent.
    let m = refused(vec![
        Item::new("each:cpu", "noop"),
        Item::new("each:cache", "spin").arg("ms", "x"),
    ])
    .await;
    assert!(m.starts_with("items[1]."), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_count_limit_applies_to_the_expanded_batch() {
    let d = Daemon::builder("two-socket")
        .config("[limits]\nmax_batch_items = 10\n")
        .start();
    let c = d.client().await;
    // 2 + 8 cores = 10: at the limit.
    c.submit(
        Batch::new()
            .items((0..2).map(|_| Item::new("all", "noop")))
            .item(Item::new("each:core", "noop")),
    )
    .await
    .expect("10 items after expansion");
    let e = c
        .submit(
            Batch::new()
                .items((0..3).map(|_| Item::new("all", "noop")))
                .item(Item::new("each:core", "noop")),
        )
        .await
        .expect_err("11 items after expansion");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let m = e.status().expect("status").message().to_string();
    assert!(
        m.contains(
            "items[3] each:core names 8 groups) is 11, over the limit limits.max_batch_items = 10"
        ),
        "{m}"
    );

    // SubmitStream: ids and indexes count expanded items.
    let r = c
        .submit_stream(
            "default",
            vec![Item::new("all", "noop"), Item::new("each:cache", "noop")],
        )
        .await
        .expect("SubmitStream");
    assert_eq!(r.item_count, 5);
    let (results, _) = c
        .clone()
        .with_timeout(Some(LONG))
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .expect("Flush");
    let mut by_id: Vec<(u64, String)> = results
        .iter()
        .map(|x| (x.item_id - r.first_item_id, x.target.clone()))
        .collect();
    by_id.sort();
    assert_eq!(
        by_id,
        [
            (0, "all".to_string()),
            (1, "cache:0".to_string()),
            (2, "cache:1".to_string()),
            (3, "cache:2".to_string()),
            (4, "cache:3".to_string()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wqctl_submit_each_prints_a_table_per_group() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    empty_llc3(&d, &c).await;
    let args = ["submit", "-t", "each:cache", "--handler", "noop", "--wait"];
    let r = d.wqctl(&args);
    r.expect_code(0);
    let lines: Vec<&str> = r.stdout.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("GROUP"))
        .unwrap_or_else(|| panic!("a table:\n{}", r.stdout));
    assert!(lines[header].contains("STATE") && lines[header].contains("FALLBACK"));
    for l in 0..4u32 {
        let row = lines[header + 1 + l as usize];
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[0], format!("cache:{l}"), "{row}");
        assert_eq!(cols[1], "ok", "{row}");
        let cpu: u32 = cols[2].parse().expect("a CPU");
        if l < 3 {
            assert!(llc(l).contains(&cpu), "{row}");
            assert_eq!(cols[3], "none", "{row}");
        } else {
            assert_eq!(cols[3], "node", "{row}");
        }
    }

    let mut json_args = vec!["-o", "json"];
    json_args.extend(args);
    let v = d.wqctl(&json_args).expect_code(0).json();
    let groups = v["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 4, "{v}");
    for (l, g) in groups.iter().enumerate() {
        assert_eq!(g["group"], format!("cache:{l}"));
        assert_eq!(g["state"], "ok");
        assert!(g["cpu"].is_u64(), "{g}");
        assert_eq!(g["fallback"], if l < 3 { "none" } else { "node" }, "{g}");
    }
    assert_eq!(v["item_count"], 4);
    assert_eq!(v["all_ok"], true);

    // A plain target prints no group table.
    let plain = d.wqctl(&["submit", "-t", "cache:0", "--handler", "noop", "--wait"]);
    assert!(
        !plain.expect_code(0).stdout.contains("GROUP"),
        "{}",
        plain.stdout
    );
}
