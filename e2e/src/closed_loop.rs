//! Closed-loop load against Karri and moto for the benchmarks that compare the two (`bench-ec2`,
//! `bench-s3`): workers that each send the next operation as soon as the previous one answered,
//! the latencies they saw, and the CPU time the serving processes spent meanwhile.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use karri_testkit::{Etcd, Gateway};

use crate::cloud::pid_by_cmdline;
use crate::moto::Moto;
use crate::report::{cpu_ticks, pct, ticks_per_second};

/// The processes that serve a benchmark, for CPU seconds (utime + stime) per operation.
pub struct Procs {
    gateway: Option<u32>,
    etcd: Option<u32>,
    moto: Option<u32>,
    ticks_per_s: f64,
}

/// CPU seconds of each side, and of this program.
#[derive(Clone, Copy, Default)]
pub struct Cpu {
    /// The gateway.
    pub gateway: f64,
    /// etcd.
    pub etcd: f64,
    /// moto's server.
    pub moto: f64,
    /// This benchmark program.
    pub client: f64,
}

impl Procs {
    /// Finds etcd and the gateway by a path unique to each in their command line.
    pub fn find(etcd: &Etcd, gateway: &Gateway, moto: &Moto) -> Procs {
        Procs {
            gateway: pid_by_cmdline(&gateway.tokens_path().display().to_string()),
            etcd: pid_by_cmdline(&etcd.data_dir().display().to_string()),
            moto: moto.pid(),
            ticks_per_s: ticks_per_second(),
        }
    }

    fn cpu_of(&self, stat: &str) -> f64 {
        cpu_ticks(stat).map_or(0.0, |t| t as f64 / self.ticks_per_s)
    }

    fn snapshot(&self) -> Cpu {
        let of = |pid: Option<u32>| pid.map_or(0.0, |p| self.cpu_of(&format!("/proc/{p}/stat")));
        Cpu {
            gateway: of(self.gateway),
            etcd: of(self.etcd),
            moto: of(self.moto),
            client: self.cpu_of("/proc/self/stat"),
        }
    }
}

/// One operation of a closed-loop run: `index` → latency and response size in bytes.
pub type Op =
    Arc<dyn Fn(usize) -> BoxFuture<'static, anyhow::Result<(Duration, usize)>> + Send + Sync>;

/// What a closed-loop run measured.
pub struct Run {
    /// Latency of each operation that succeeded.
    pub lat: Vec<Duration>,
    /// Indices of the operations that succeeded, in order.
    pub done: Vec<usize>,
    /// From the first operation sent to the last answered.
    pub wall: Duration,
    /// Operations that failed.
    pub errors: usize,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// Response bytes of the operations that succeeded.
    pub bytes: usize,
    /// CPU seconds spent during the run.
    pub cpu: Cpu,
}

impl Run {
    /// Successful operations per second.
    pub fn rate(&self) -> f64 {
        self.lat.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The nearest-rank `p`th percentile latency.
    pub fn p(&mut self, p: f64) -> Duration {
        pct(&mut self.lat, p)
    }

    /// Counts a failure found after the run (a wrong body read back, say).
    pub fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    /// Whether anything succeeded and nothing failed.
    pub fn clean(&self) -> bool {
        self.errors == 0 && !self.lat.is_empty()
    }

    /// The table cells `count err rate p50 p99`, the latency columns `width` wide.
    pub fn cells(&mut self, width: usize) -> String {
        let (p50, p99) = (self.p(50.0), self.p(99.0));
        format!(
            "{:>6} {:>4} {:>9.1} {:>width$} {:>width$}",
            self.lat.len(),
            self.errors,
            self.rate(),
            ms(p50),
            ms(p99)
        )
    }

    /// CPU per operation of the run on `side` (`Karri` or `moto`), one line; `unit` names an
    /// operation (`op`, `request`).
    pub fn cpu_line(&self, side: &str, unit: &str) -> String {
        let n = self.lat.len().max(1) as f64;
        let per = |s: f64| s * 1e6 / n;
        let servers = if side == "moto" {
            format!("moto {:.0} us", per(self.cpu.moto))
        } else {
            format!(
                "gateway {:.0} us, etcd {:.0} us",
                per(self.cpu.gateway),
                per(self.cpu.etcd)
            )
        };
        format!(
            "      {side:<5} cpu per {unit}: {servers}, bench client {:.0} us",
            per(self.cpu.client)
        )
    }
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Runs `op` from `concurrency` workers until `max_ops` were started or `cap` elapsed.
pub async fn closed_loop(
    procs: &Procs,
    concurrency: usize,
    max_ops: usize,
    cap: Duration,
    op: Op,
) -> Run {
    let before = procs.snapshot();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let next = next.clone();
        let op = op.clone();
        handles.push(tokio::spawn(async move {
            let (mut lat, mut done, mut errs, mut bytes) =
                (Vec::new(), Vec::new(), Vec::new(), 0usize);
            while start.elapsed() < cap {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= max_ops {
                    break;
                }
                match op(i).await {
                    Ok((d, n)) => {
                        lat.push(d);
                        done.push(i);
                        bytes += n;
                    }
                    Err(e) => errs.push(format!("{e:#}")),
                }
            }
            (lat, done, errs, bytes)
        }));
    }
    let mut run = Run {
        lat: Vec::new(),
        done: Vec::new(),
        wall: Duration::ZERO,
        errors: 0,
        first_error: None,
        bytes: 0,
        cpu: Cpu::default(),
    };
    for h in handles {
        match h.await {
            Ok((lat, done, errs, bytes)) => {
                run.lat.extend(lat);
                run.done.extend(done);
                run.bytes += bytes;
                run.errors += errs.len();
                if run.first_error.is_none() {
                    run.first_error = errs.into_iter().next();
                }
            }
            Err(e) => run.error(e.to_string()),
        }
    }
    run.wall = start.elapsed();
    let after = procs.snapshot();
    run.cpu = Cpu {
        gateway: after.gateway - before.gateway,
        etcd: after.etcd - before.etcd,
        moto: after.moto - before.moto,
        client: after.client - before.client,
    };
    run.done.sort_unstable();
    run
}
