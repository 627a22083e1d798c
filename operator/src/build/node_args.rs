//! The command lines the operator builds, read by kache-node's own parser (its clap `Cli`
//! and the checks it makes at start-up): every one is accepted and means what the spec
//! says, every flag the operator sets is one kache-node has, and `extraArgs` can neither set
//! one of them again nor change what they say.

use super::{container_args, statefulset};
use crate::crd::validate::{managed_flags, MANAGED_FLAGS, NODE_SWITCHES};
use crate::crd::{CacheClusterSpec, SpecError};
use crate::fixtures::{representative_specs, unchecked_cluster, valid_cluster};
use clap::{CommandFactory, Parser};
use kache_cluster::size::MIB;
use kache_node::config::{Cli, Command, ServeArgs};
use std::collections::BTreeSet;

/// Why kache-node would not start with a command line.
#[derive(Debug, thiserror::Error)]
enum NodeRefusal {
    /// Its parser refuses it.
    #[error("{0}")]
    Parse(#[from] clap::Error),
    /// It is not the `serve` command.
    #[error("not `serve`")]
    NotServe,
    /// Its start-up checks refuse it.
    #[error("{0}")]
    Start(#[from] kache_node::config::FlagError),
}

/// kache-node's reading of `args` (its argv after the program name).
fn node_parse(args: &[String]) -> Result<ServeArgs, NodeRefusal> {
    let argv = std::iter::once("kache-node".to_string()).chain(args.iter().cloned());
    match Cli::try_parse_from(argv)?.command {
        Some(Command::Serve(serve)) => Ok(serve),
        _ => Err(NodeRefusal::NotServe),
    }
}

/// Whether kache-node would start with `args`: parsed, then checked as at start-up.
fn node_starts(args: &[String]) -> Result<(), NodeRefusal> {
    node_parse(args)?.validate()?;
    Ok(())
}

/// The parsed values of the flags the operator sets.
fn managed_values(serve: &ServeArgs) -> String {
    let c = &serve.cluster;
    format!(
        "{:?}",
        (
            (serve.port, &serve.listen, serve.memory_limit_mb),
            (serve.conn_limit, serve.threads, serve.max_item_size),
            (
                serve.admin_port,
                c.peer_port,
                &c.membership.cluster,
                serve.shutdown_delay_secs
            ),
            (&serve.tls_cert, &serve.tls_key, &serve.tls_client_ca),
            (&serve.peer_tls_ca, &serve.auth_file, &c.peer_secret_file),
            &serve.memcached.memory_file,
            (c.write_acks, c.write_timeout_ms, c.tombstone_ttl),
            (c.anti_entropy_interval_secs, c.anti_entropy_rate),
            (c.peer_queue_bytes, c.peer_timeout_ms),
        )
    )
}

/// The `serve` subcommand as kache-node's parser defines it.
fn serve_command() -> clap::Command {
    let mut cli = Cli::command();
    cli.build();
    cli.find_subcommand("serve")
        .cloned()
        .unwrap_or_else(|| panic!("kache-node has no serve command"))
}

#[test]
fn every_built_command_line_is_one_kache_node_takes() {
    for (name, spec) in representative_specs() {
        let valid = spec.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let args = container_args(&valid_cluster("web", spec.clone()));
        let serve = node_parse(&args).unwrap_or_else(|e| panic!("{name}: {args:?}: {e}"));
        if let Err(e) = serve.validate() {
            panic!("{name}: kache-node refuses {args:?}: {e}");
        }
        assert_eq!(i32::from(serve.port), spec.port, "{name}");
        assert_eq!(
            serve.memory_limit_mb,
            u64::try_from(spec.memory_mib).unwrap()
        );
        assert_eq!(
            serve.conn_limit,
            u64::try_from(spec.max_connections).unwrap()
        );
        assert_eq!(serve.threads, Some(u64::try_from(spec.threads).unwrap()));
        assert_eq!(serve.max_item_size as u64, valid.max_item_size, "{name}");
        assert_eq!(
            serve.cluster.membership.cluster.as_deref(),
            Some("web"),
            "{name}"
        );
        assert_eq!(serve.tls_client_ca.is_some(), spec.tls.is_some(), "{name}");
        assert_eq!(serve.auth_file.is_some(), spec.auth.is_some(), "{name}");
        assert_eq!(
            serve.memcached.memory_file.is_some(),
            spec.persistence.enabled,
            "{name}"
        );
    }
}

#[test]
fn the_replication_fields_reach_kache_node() {
    let (_, spec) = representative_specs()
        .into_iter()
        .find(|(name, _)| *name == "replication")
        .unwrap();
    let serve = node_parse(&container_args(&valid_cluster("web", spec))).unwrap();
    let c = &serve.cluster;
    assert_eq!(
        c.write_acks,
        kache_node::peer::replicate::WriteAcks::Quorum,
        "writeAcks quorum"
    );
    assert_eq!(
        (
            c.write_timeout_ms,
            c.tombstone_ttl,
            c.anti_entropy_interval_secs
        ),
        (250, 3600, 0)
    );
    assert_eq!(c.anti_entropy_rate as u64, 64 * MIB);
    assert_eq!(c.peer_queue_bytes as u64, 1024 * MIB);
    assert_eq!(c.peer_timeout_ms, 10);
    // Unset, kache-node keeps its defaults: the operator passes nothing.
    let default_args = container_args(&valid_cluster("web", CacheClusterSpec::default()));
    let defaults = node_parse(&default_args).unwrap();
    let bare = node_parse(&["serve".to_string()]).unwrap();
    assert_eq!(
        format!("{:?}", defaults.cluster.peer_limits()),
        format!("{:?}", bare.cluster.peer_limits())
    );
    assert!(!default_args.iter().any(|a| a.starts_with("--write")));
}

#[test]
fn the_statefulset_passes_the_replication_fields() {
    let (_, spec) = representative_specs()
        .into_iter()
        .find(|(name, _)| *name == "replication")
        .unwrap();
    let sts = statefulset(&valid_cluster("web", spec), "img:1");
    let pod = sts.spec.unwrap().template.spec.unwrap();
    let args = pod.containers[0].args.clone().unwrap().join(" ");
    assert!(
        args.ends_with(
            "--write-acks quorum --write-timeout-ms 250 --tombstone-ttl 3600 \
             --anti-entropy-interval 0 --anti-entropy-rate 64M --peer-queue-bytes 1g \
             --peer-timeout-ms 10"
        ),
        "{args}"
    );
}

#[test]
fn the_operator_sets_no_flag_it_does_not_manage() {
    for (name, spec) in representative_specs() {
        let managed: BTreeSet<&str> = managed_flags(&spec).iter().map(|m| m.0).collect();
        let args = container_args(&valid_cluster("web", spec.clone()));
        let own = &args[..args.len() - spec.extra_args.len()];
        for flag in own.iter().filter(|a| a.starts_with('-')) {
            assert!(
                managed.contains(flag.as_str()),
                "{name}: {flag} is not managed"
            );
        }
    }
}

#[test]
fn managed_flags_are_kache_nodes_own_with_their_short_forms() {
    let serve = serve_command();
    let (_, replication) = representative_specs()
        .into_iter()
        .find(|(name, _)| *name == "replication")
        .unwrap();
    let all = managed_flags(&replication);
    assert!(
        all.len() > MANAGED_FLAGS.len(),
        "replication flags are managed when set"
    );
    for (long, short) in all {
        let name = long.trim_start_matches("--");
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(name))
            .unwrap_or_else(|| panic!("kache-node serve has no {long}"));
        let node_short = arg.get_short().map(|c| format!("-{c}")).unwrap_or_default();
        assert_eq!(short, node_short, "the short form of {long}");
        // An alias would be a way around the check.
        assert_eq!(arg.get_all_aliases(), None, "{long} has aliases");
        assert_eq!(
            arg.get_all_short_aliases(),
            None,
            "{long} has short aliases"
        );
    }
}

#[test]
fn node_switches_are_kache_nodes_short_flags_without_a_value() {
    let switches: BTreeSet<char> = serve_command()
        .get_arguments()
        .filter(|a| !a.get_action().takes_values())
        .filter_map(|a| a.get_short())
        .collect();
    let listed: BTreeSet<char> = NODE_SWITCHES.chars().collect();
    // -V (version) belongs to the top-level command only; it is harmless to list.
    let listed_here: BTreeSet<char> = listed.iter().copied().filter(|c| *c != 'V').collect();
    assert_eq!(switches, listed_here);
}

/// Ways `extraArgs` could set `long` (short form `short`) again.
fn overrides(long: &str, short: &str) -> Vec<Vec<String>> {
    let mut ways = vec![
        vec![long.to_string(), "1".into()],
        vec![format!("{long}=1")],
    ];
    if let Some(c) = short.strip_prefix('-') {
        ways.push(vec![short.to_string(), "1".into()]);
        ways.push(vec![format!("{short}1")]);
        for w in NODE_SWITCHES.chars() {
            ways.push(vec![format!("-{w}{c}1")]);
            ways.push(vec![format!("-{w}{w}{c}"), "1".into()]);
        }
    }
    ways
}

#[test]
fn extra_args_cannot_set_a_managed_flag() {
    for (name, spec) in representative_specs() {
        for (long, short) in managed_flags(&spec) {
            for way in overrides(long, short) {
                let mut bad = spec.clone();
                bad.extra_args.extend(way.iter().cloned());
                let errs = bad.validate().expect_err(&format!("{name}: {way:?}"));
                assert!(
                    errs.0.contains(&SpecError::ManagedFlag(long)),
                    "{name}: {way:?}: {errs}"
                );
            }
        }
    }
}

#[test]
fn extra_args_that_pass_leave_the_managed_flags_as_the_spec_says() {
    let harmless: &[&[&str]] = &[
        &["-v"],
        &["-vvv"],
        &["--verbose"],
        &["-M"],
        &["-vM"],
        &["-o", "modern"],
        &["-omodern"],
        &["-vomodern"],
        &["-R", "40"],
        &["-vR40"],
        &["--handoff-rate", "1000"],
        &["--shutdown-grace=5"],
    ];
    let without_replication = representative_specs()
        .into_iter()
        .filter(|(_, s)| s.replication.is_none());
    for (name, spec) in without_replication {
        let expected = managed_values(
            &node_parse(&container_args(&valid_cluster("web", spec.clone()))).unwrap(),
        );
        let mut extras: Vec<Vec<String>> = harmless
            .iter()
            .map(|a| a.iter().map(|s| (*s).to_string()).collect())
            .collect();
        // Unset in the spec, the replication flags are the user's to pass.
        extras.push(vec!["--write-acks".into(), "all".into()]);
        extras.push(vec!["--peer-queue-bytes=4m".into()]);
        for extra in extras {
            let mut with = spec.clone();
            with.extra_args.extend(extra.iter().cloned());
            assert!(with.validate().is_ok(), "{name}: {extra:?}");
            let serve = node_parse(&container_args(&valid_cluster("web", with)))
                .unwrap_or_else(|e| panic!("{name}: {extra:?}: {e}"));
            let is_replication = extra[0].starts_with("--write") || extra[0].starts_with("--peer");
            if !is_replication {
                assert_eq!(managed_values(&serve), expected, "{name}: {extra:?}");
            }
        }
    }
}

/// What the CRD takes for `maxItemSize` and `memoryMiB` is what kache-node takes with them.
#[test]
fn max_item_size_is_accepted_exactly_when_kache_node_accepts_it() {
    let sizes = [
        "0", "1", "1023", "1024", "1k", "1K", "1025", "512k", "1m", "1M", "2m", "4m", "8m",
        "8192k", "8193k", "9m", "1g", "2G", "1024b", "+1m", "01m", "1.5m", "1x", "m", "",
    ];
    for memory_mib in [1, 2, 3, 16, 17, 64, 1024] {
        for text in sizes {
            let spec = CacheClusterSpec {
                memory_mib,
                max_item_size: text.into(),
                ..Default::default()
            };
            let operator = spec.validate();
            let args = container_args(&unchecked_cluster("web", &spec));
            let node = node_starts(&args);
            assert_eq!(
                operator.is_ok(),
                node.is_ok(),
                "-m {memory_mib} -I {text:?}: operator {operator:?}, node {:?}",
                node.err()
            );
        }
    }
    assert!(
        kache_node::peer::wire::MAX_PEER_ITEM as u64 == kache_cluster::size::MAX_CLUSTER_ITEM_SIZE
    );
}

/// The `replication` numbers and sizes the CRD takes are those kache-node takes.
#[test]
fn replication_ranges_are_kache_nodes() {
    use crate::crd::ReplicationConfig;
    type Field<T> = (&'static str, fn(T) -> ReplicationConfig);
    let number_fields: [Field<i32>; 4] = [
        ("--write-timeout-ms", |v| ReplicationConfig {
            write_timeout_ms: Some(v),
            ..Default::default()
        }),
        ("--tombstone-ttl", |v| ReplicationConfig {
            tombstone_ttl_seconds: Some(v),
            ..Default::default()
        }),
        ("--anti-entropy-interval", |v| ReplicationConfig {
            anti_entropy_interval_seconds: Some(v),
            ..Default::default()
        }),
        ("--peer-timeout-ms", |v| ReplicationConfig {
            peer_timeout_ms: Some(v),
            ..Default::default()
        }),
    ];
    let values = [
        -1, 0, 1, 9, 10, 11, 86_400, 86_401, 600_000, 600_001, 2_592_000, 2_592_001,
    ];
    for (flag, field) in number_fields {
        for v in values {
            let spec = CacheClusterSpec {
                replication: Some(field(v)),
                ..Default::default()
            };
            agree(&spec, &format!("{flag} {v}"));
        }
    }
    let size_fields: [Field<String>; 2] = [
        ("--anti-entropy-rate", |v| ReplicationConfig {
            anti_entropy_rate: Some(v),
            ..Default::default()
        }),
        ("--peer-queue-bytes", |v| ReplicationConfig {
            peer_queue_bytes: Some(v),
            ..Default::default()
        }),
    ];
    for (flag, field) in size_fields {
        for v in ["1023", "1k", "16m", "1g", "1025m", "2g", "x", "1.5m"] {
            let spec = CacheClusterSpec {
                replication: Some(field(v.into())),
                ..Default::default()
            };
            agree(&spec, &format!("{flag} {v}"));
        }
    }
}

/// The operator validates `spec` exactly when kache-node takes the command line built of it.
fn agree(spec: &CacheClusterSpec, what: &str) {
    let operator = spec.validate();
    let node = node_starts(&container_args(&unchecked_cluster("web", spec)));
    assert_eq!(
        operator.is_ok(),
        node.is_ok(),
        "{what}: operator {operator:?}, node {:?}",
        node.err()
    );
}
