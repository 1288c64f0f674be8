//! Real pinning on this host: the engine runs on the host's live topology, and every item's
//! handler observes (`sched_getcpu`) that it runs on the CPU its result names.

use std::sync::Arc;
use std::time::Duration;

use wqd_core::engine::{Engine, EngineConfig, FlushScope, ItemSpec, State};
use wqd_core::handler::{Args, Handler, HandlerError, Registry, WorkCtx};
use wqd_core::live::{LiveConfig, LiveView};
use wqd_core::target::Target;
use wqd_core::topology::sysfs::Reader;

struct WhereAmI;

impl Handler for WhereAmI {
    fn name(&self) -> &str {
        "where"
    }
    fn validate(&self, _a: &Args, _p: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        // SAFETY: no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        assert!(ctx.pinned);
        Ok(cpu.to_string().into_bytes())
    }
}

#[test]
fn items_run_on_the_cpu_their_result_names() {
    let view = LiveView::new(Reader::host().read().unwrap(), LiveConfig::default());
    let snap = view.current();
    let mut reg = Registry::new();
    reg.register(Arc::new(WhereAmI));
    let engine = Engine::start(EngineConfig::default(), reg, snap.clone()).unwrap();
    let live: Vec<u32> = snap.live.iter().collect();
    assert!(!live.is_empty());
    let mut items = Vec::new();
    for _ in 0..50 {
        for &c in &live {
            items.push(ItemSpec::new(Target::Cpu(c), "where"));
        }
        items.push(ItemSpec::new(Target::All, "where"));
    }
    let r = engine.submit("default", items).unwrap();
    let ids: Vec<u64> = r.items.iter().map(|i| i.id).collect();
    engine
        .flush(FlushScope::Items(ids.clone()))
        .unwrap()
        .wait(Some(Duration::from_secs(30)))
        .unwrap();
    for res in engine.results(&ids) {
        let res = res.unwrap();
        assert_eq!(res.state, State::Ok, "{res:?}");
        let seen: u32 = String::from_utf8_lossy(&res.output).parse().unwrap();
        assert_eq!(
            Some(seen),
            res.cpu_started,
            "handler ran where the result says"
        );
        if let Target::Cpu(c) = res.target {
            assert_eq!(seen, c);
        }
    }
}
