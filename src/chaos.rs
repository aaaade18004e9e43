//! Chaos for a local fleet: at a configurable pace and seed, one fault at a time, each undone after
//! a while: kill a replica and start it again, freeze it (SIGSTOP) and thaw it, make it slow, make
//! it report NOT_SERVING, and, for a replica isolated in a network namespace (Linux, root), cut
//! its network (a blackhole: no RST, no FIN). Every fault is reported as it happens, so a
//! `meshlb client --watch` beside it shows the balancer routing around each one.
//!
//! Knows the fleet and its admin listeners; nothing of balancing.

use crate::fleet::{Launch, RunningFleet};
use crate::replica::FaultConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How chaos behaves.
#[derive(Debug, Clone, Copy)]
pub struct ChaosConfig {
    /// The mean pause between faults (each pause is 0.5x to 1.5x of it).
    pub every: Duration,
    /// How long each fault lasts before it is undone.
    pub length: Duration,
    /// The seed: the same seed on the same fleet gives the same faults in the same order.
    pub seed: u64,
    /// The latency a "slow" fault adds.
    pub slow_latency: Duration,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(5),
            length: Duration::from_secs(2),
            seed: 1,
            slow_latency: Duration::from_millis(200),
        }
    }
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then start it again on its address.
    Kill,
    /// SIGSTOP, then SIGCONT: the process accepts nothing and answers nothing meanwhile.
    Freeze,
    /// Added latency through the admin listener.
    Slow,
    /// NOT_SERVING through the admin listener.
    NotServing,
    /// Its network namespace's link down: packets vanish.
    Blackhole,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fault::Kill => "kill -9",
            Fault::Freeze => "freeze (SIGSTOP)",
            Fault::Slow => "slow",
            Fault::NotServing => "NOT_SERVING",
            Fault::Blackhole => "blackhole (link down)",
        })
    }
}

/// Runs faults on `fleet` until `stop` resolves, reporting each through `say`; leaves every
/// replica as it found it.
pub async fn run(
    fleet: &mut RunningFleet,
    launch: &Launch,
    config: ChaosConfig,
    mut say: impl FnMut(String),
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let started = Instant::now();
    tokio::pin!(stop);
    loop {
        let pause = config.every.mul_f64(rng.random_range(0.5..1.5));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = &mut stop => return Ok(()),
        }
        if fleet.members.is_empty() {
            return Ok(());
        }
        let i = rng.random_range(0..fleet.members.len());
        let mut kinds = vec![Fault::Kill, Fault::Freeze, Fault::Slow, Fault::NotServing];
        if fleet.members[i].is_isolated() {
            kinds.push(Fault::Blackhole);
        }
        let fault = kinds[rng.random_range(0..kinds.len())];
        let id = fleet.members[i].id.clone();
        let t = |at: Instant| at.duration_since(started).as_secs_f64();
        say(format!(
            "t={:.1}s chaos: {fault} {id} for {}",
            t(Instant::now()),
            humantime::format_duration(config.length)
        ));
        // A fault that cannot be applied or undone is reported, not fatal: the fleet must still
        // drain properly at the end.
        if let Err(error) = apply(fleet, i, fault, &config, true).await {
            say(format!(
                "t={:.1}s chaos: {fault} {id} failed: {error:#}",
                t(Instant::now())
            ));
            continue;
        }
        let undo_at = crate::balance::deadline::expiry(Instant::now(), config.length);
        let stopping = tokio::select! {
            () = tokio::time::sleep_until(undo_at) => false,
            () = &mut stop => true,
        };
        let undone = if fault == Fault::Kill {
            fleet.restart(i, launch).await.map_err(anyhow::Error::from)
        } else {
            apply(fleet, i, fault, &config, false).await
        };
        if let Err(error) = undone {
            say(format!(
                "t={:.1}s chaos: undoing {fault} on {id} failed: {error:#}",
                t(Instant::now())
            ));
        }
        say(format!(
            "t={:.1}s chaos: {id} back ({fault} undone)",
            t(Instant::now())
        ));
        if stopping {
            return Ok(());
        }
    }
}

async fn apply(
    fleet: &mut RunningFleet,
    i: usize,
    fault: Fault,
    config: &ChaosConfig,
    on: bool,
) -> anyhow::Result<()> {
    let member = &mut fleet.members[i];
    match fault {
        Fault::Kill => {
            #[cfg(unix)]
            member.signal(libc::SIGKILL);
        }
        Fault::Freeze => {
            #[cfg(unix)]
            member.signal(if on { libc::SIGSTOP } else { libc::SIGCONT });
        }
        Fault::Slow => {
            let faults = if on {
                FaultConfig {
                    latency: member.faults.latency + config.slow_latency,
                    ..member.faults
                }
            } else {
                member.faults
            };
            member
                .admin
                .set_faults(faults)
                .await
                .map_err(|s| anyhow::anyhow!("chaos: {}: {}", member.id, s.message()))?;
        }
        Fault::NotServing => member
            .admin
            .set_serving(!on)
            .await
            .map_err(|s| anyhow::anyhow!("chaos: {}: {}", member.id, s.message()))?,
        Fault::Blackhole => member.blackhole(on)?,
    }
    Ok(())
}
