//! What the spec's unset fields resolve to, and the values the pods' settings are derived
//! from: [`super::validate`] resolves them once into the [`super::ValidSpec`] the builders
//! take.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

/// Seconds a node keeps accepting after SIGTERM while it reports not ready (kache-node
/// `--shutdown-delay`): kube-proxy drops its endpoint meanwhile, so clients reaching the
/// cluster through its Service are not refused while a pod stops (rolls, scale-ins).
pub const SHUTDOWN_DELAY_SECONDS: i64 = 5;
/// kache-node's `--shutdown-grace` default: what open connections get after the delay.
pub const NODE_SHUTDOWN_GRACE_SECONDS: i64 = 10;
/// Time, after the grace, to seal the memory file and exit.
pub const EXIT_SECONDS: i64 = 5;
/// The least `terminationGracePeriodSeconds`: long enough for a node to leave the member
/// list and drain its connections.
pub const MIN_TERMINATION_GRACE_PERIOD_SECONDS: i64 = 60;
/// Smallest memory headroom on top of the cache memory, in MiB.
pub const MIN_HEADROOM_MIB: i64 = 64;
/// CPU request per worker thread, in millicores.
pub const CPU_MILLIS_PER_THREAD: i64 = 100;

/// The pods' `terminationGracePeriodSeconds`: the kubelet's SIGKILL must not cut short the
/// shutdown delay plus the `--shutdown-grace` (kache-node's default unless `extraArgs`
/// sets it) and the exit; never less than [`MIN_TERMINATION_GRACE_PERIOD_SECONDS`].
pub fn termination_grace_period_seconds(args: &[String]) -> i64 {
    let grace = args
        .iter()
        .enumerate()
        .find_map(|(i, arg)| match arg.strip_prefix("--shutdown-grace") {
            Some("") => args.get(i + 1).and_then(|v| v.parse::<i64>().ok()),
            Some(rest) => rest.strip_prefix('=').and_then(|v| v.parse::<i64>().ok()),
            None => None,
        })
        .unwrap_or(NODE_SHUTDOWN_GRACE_SECONDS);
    SHUTDOWN_DELAY_SECONDS
        .saturating_add(grace.max(0))
        .saturating_add(EXIT_SECONDS)
        .max(MIN_TERMINATION_GRACE_PERIOD_SECONDS)
}

/// Size of the memory file for `memory_mib` of cache, in MiB, rounded up: the segments,
/// plus a 64-byte table entry per segment (segments are at least 1 MiB for large caches)
/// and a header page.
pub fn memory_file_mib(memory_mib: u32) -> i64 {
    let mem = i64::from(memory_mib);
    mem + mem / 16384 + 1
}

/// Resources when the spec sets none: memory request = limit = `memoryMiB`
/// plus 25% (at least 64 MiB) headroom for connections and allocator
/// overhead; a CPU request of 100m per thread and no CPU limit (throttling
/// hurts tail latency more than it protects neighbours). With the memory file
/// (`persistent`), its tmpfs pages count against the container's memory: they
/// are the cache memory itself, plus the file's segment table.
pub fn default_resources(memory_mib: u32, threads: u32, persistent: bool) -> ResourceRequirements {
    let mem = i64::from(memory_mib);
    let cache = if persistent {
        memory_file_mib(memory_mib)
    } else {
        mem
    };
    let total = cache + (mem / 4).max(MIN_HEADROOM_MIB);
    let memory = Quantity(format!("{total}Mi"));
    let cpu = Quantity(format!(
        "{}m",
        i64::from(threads.max(1)) * CPU_MILLIS_PER_THREAD
    ));
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), cpu),
            ("memory".to_string(), memory.clone()),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), memory)])),
        ..ResourceRequirements::default()
    }
}
