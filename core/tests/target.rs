//! Target grammar: canonical Display round-trips through the parser, and the parser never
//! panics on arbitrary input.

use proptest::prelude::*;
use wqd_core::target::{Target, RESERVED};
use wqd_core::CpuSet;

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_-]{0,10}".prop_filter("reserved", |n| !RESERVED.contains(&n.as_str()))
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        (0u32..8192).prop_map(Target::Cpu),
        (0u32..8192).prop_map(Target::Core),
        any::<u32>().prop_map(Target::Cache),
        any::<u32>().prop_map(Target::Shard),
        any::<u32>().prop_map(Target::Node),
        any::<u32>().prop_map(Target::Package),
        proptest::collection::btree_set(0u32..8192, 1..40)
            .prop_map(|s| Target::Cpus(s.into_iter().collect::<CpuSet>())),
        name().prop_map(Target::Named),
        (name(), any::<u32>()).prop_map(|(name, index)| Target::Partition { name, index }),
        Just(Target::All),
    ]
}

proptest! {
    #[test]
    fn display_round_trips(t in target(), pad_l in "[ \t\n]{0,2}", pad_r in "[ \t\n]{0,2}") {
        let s = t.to_string();
        prop_assert_eq!(s.parse::<Target>().unwrap(), t.clone());
        let padded = format!("{pad_l}{s}{pad_r}");
        prop_assert_eq!(padded.parse::<Target>().unwrap(), t);
    }

    #[test]
    fn parser_never_panics(s in "\\PC{0,24}") {
        let _ = s.parse::<Target>();
    }

    #[test]
    fn parsed_targets_print_canonically(s in "(cpu|core|node|cpus|rcu|all)(:[0-9,:/-]{0,10})?") {
        if let Ok(t) = s.parse::<Target>() {
            let again: Target = t.to_string().parse().unwrap();
            prop_assert_eq!(again.to_string(), t.to_string());
        }
    }
}

#[test]
fn canonical_examples() {
    for (input, canonical) in [
        ("cpus:0-15", "cpus:0-15"),
        ("cpus:15,0-14", "cpus:0-15"),
        ("cpus:0-1023:2/256", "cpus:0-1,256-257,512-513,768-769"),
        (" rcu:3 ", "rcu:3"),
        ("node:01", "node:1"),
    ] {
        assert_eq!(input.parse::<Target>().unwrap().to_string(), canonical);
    }
}
