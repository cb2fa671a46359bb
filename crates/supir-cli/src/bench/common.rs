//! What the per-backend benches share: timing loops, peak-memory windows, the CPU and load
//! figures, the table and JSON rows, and running a PyTorch reference script whose stage lines
//! (`label\tmedian_s=..\tmin_s=..\tpeak_rss_gib=..[\tfirst_s=..]`) are put beside ours.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use supir::memory::peak_rss_gib;

/// Times of one stage from one implementation.
#[derive(Clone, Debug)]
pub(super) struct Timing {
    pub best: f64,
    pub median: f64,
    pub peak_gib: Option<f64>,
    /// For the reference: CPU seconds / wall seconds of its process over the stage (warm-up
    /// included), sampled from `/proc`.
    pub cores: Option<f64>,
    /// Wall seconds of the first (cold) call, when it was timed.
    pub first: Option<f64>,
}

/// One line of the table.
pub(super) struct Row {
    pub stage: &'static str,
    /// What the stage ran with when a bench compares several settings (e.g. a weight dtype).
    pub variant: Option<String>,
    /// Sorted seconds of the timed runs (empty for a derived row).
    pub times: Vec<f64>,
    pub ours: Timing,
    pub torch: Option<Timing>,
    /// The row is a sum of other rows.
    pub derived: bool,
    /// CPU cores our fastest run got (CPU seconds / wall seconds).
    pub cores: Option<f64>,
    /// CPU seconds of our fastest run (all threads): less sensitive to a busy machine than
    /// wall time, as long as no thread spins idle.
    pub cpu_s: Option<f64>,
    /// Load average when the stage ended.
    pub load: Option<f64>,
}

pub(super) fn timing(times: &[f64], peak_gib: Option<f64>) -> Timing {
    Timing {
        best: times[0],
        // The upper median, as the reference scripts take it.
        median: times[times.len() / 2],
        peak_gib,
        cores: None,
        first: None,
    }
}

pub(super) fn mem_available_gib() -> Option<f64> {
    supir::memory::proc_kib("/proc/meminfo", "MemAvailable").map(|k| k / (1024.0 * 1024.0))
}

/// Starts a new peak-memory window: returns freed heap to the system and resets `VmHWM` to the
/// current resident set (Linux `clear_refs` 5; silently nothing elsewhere).
pub(super) fn reset_peak() {
    supir::memory::release_free_heap();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU seconds used by this process so far (all threads), when known.
fn cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        // SAFETY: getrusage writes into the zeroed struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            return Some(tv(ru.ru_utime) + tv(ru.ru_stime));
        }
    }
    None
}

/// The 1-minute load average: how busy the machine was (other processes included).
pub(super) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The CPU: `/proc/cpuinfo`'s model name (else the architecture) and the vector extensions the
/// compute kernels pick from, e.g. `Intel(R) Xeon(R) ... (AVX-512F yes, AVX2 yes)`.
pub(super) fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    });
    let model = model.unwrap_or_else(|| std::env::consts::ARCH.to_string());
    #[cfg(target_arch = "x86_64")]
    {
        let yn = |b: bool| if b { "yes" } else { "no" };
        format!(
            "{model} (AVX-512F {}, AVX2 {}, FMA {})",
            yn(std::arch::is_x86_feature_detected!("avx512f")),
            yn(std::arch::is_x86_feature_detected!("avx2")),
            yn(std::arch::is_x86_feature_detected!("fma")),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        format!("{model} (AVX-512F no, AVX2 no)")
    }
}

/// Timed runs of one stage.
pub(super) struct Timed<T> {
    /// Sorted wall seconds.
    pub times: Vec<f64>,
    /// CPU seconds / wall seconds of the fastest run: the cores it got.
    pub cores: Option<f64>,
    /// Wall seconds of the first warm-up run (the one that fills the caches, e.g. the
    /// cross-attention keys/values of the text context).
    pub first: Option<f64>,
    pub last: T,
}

/// `warmup` untimed runs, then `reps` timed ones.
pub(super) fn time<T>(
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<T>,
) -> Result<Timed<T>> {
    let mut first = None;
    for _ in 0..warmup {
        let t0 = Instant::now();
        f()?;
        first.get_or_insert(t0.elapsed().as_secs_f64());
    }
    let mut runs = Vec::with_capacity(reps);
    let mut last = None;
    for _ in 0..reps {
        let c0 = cpu_seconds();
        let t0 = Instant::now();
        let out = f()?;
        let wall = t0.elapsed().as_secs_f64();
        let cores = c0.zip(cpu_seconds()).map(|(a, b)| (b - a) / wall);
        runs.push((wall, cores));
        last = Some(out);
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(Timed {
        times: runs.iter().map(|r| r.0).collect(),
        cores: runs[0].1,
        first,
        last: last.expect("reps >= 1"),
    })
}

pub(super) fn note(msg: impl AsRef<str>) {
    eprintln!("  {}", msg.as_ref());
    let _ = std::io::stderr().flush();
}

/// Builds a network, timing the build.
pub(super) fn build<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    reset_peak();
    let t0 = Instant::now();
    let net = f().with_context(|| format!("building {what}"))?;
    note(format!(
        "{what}: built in {:.1} s, peak {}",
        t0.elapsed().as_secs_f64(),
        gib(peak_rss_gib())
    ));
    Ok(net)
}

pub(super) fn gib(g: Option<f64>) -> String {
    g.map_or("?".into(), |g| format!("{g:.1} GiB"))
}

/// Records a measured stage (and says how it went on stderr).
pub(super) fn push<T>(rows: &mut Vec<Row>, stage: &'static str, timed: &Timed<T>) {
    let mut t = timing(&timed.times, peak_rss_gib());
    t.first = timed.first;
    let load = load_average();
    note(format!(
        "{stage}: best {:.3} s, median {:.3} s{}, peak {}, {} cores used, load {}",
        t.best,
        t.median,
        timed
            .first
            .map_or(String::new(), |f| format!(" (first warm-up run {f:.3} s)")),
        gib(t.peak_gib),
        timed.cores.map_or("?".into(), |c| format!("{c:.2}")),
        load.map_or("?".into(), |l| format!("{l:.1}")),
    ));
    rows.push(Row {
        stage,
        variant: None,
        times: timed.times.clone(),
        ours: t,
        torch: None,
        derived: false,
        cores: timed.cores,
        cpu_s: timed.cores.map(|c| c * timed.times[0]),
        load,
    });
}

/// Sums of timings (best with best, median with median, first with first), weighted.
pub(super) fn sum_timings(parts: &[(&Timing, f64)]) -> Timing {
    Timing {
        best: parts.iter().map(|(t, w)| t.best * w).sum(),
        median: parts.iter().map(|(t, w)| t.median * w).sum(),
        peak_gib: parts
            .iter()
            .filter_map(|(t, _)| t.peak_gib)
            .reduce(f64::max),
        cores: None,
        first: parts
            .iter()
            .map(|(t, w)| t.first.map(|f| f * w))
            .sum::<Option<f64>>(),
    }
}

/// A row summing other rows.
pub(super) fn push_sum(rows: &mut Vec<Row>, stage: &'static str, parts: &[&str]) {
    let variant = rows.last().and_then(|r| r.variant.clone());
    let found: Vec<&Row> = rows
        .iter()
        .filter(|r| parts.contains(&r.stage) && r.variant == variant)
        .collect();
    if found.len() != parts.len() {
        return;
    }
    let timings: Vec<(&Timing, f64)> = found.iter().map(|r| (&r.ours, 1.0)).collect();
    let ours = sum_timings(&timings);
    let cpu_s = found.iter().map(|r| r.cpu_s).sum();
    rows.push(Row {
        stage,
        variant,
        times: vec![],
        ours,
        torch: None,
        derived: true,
        cores: None,
        cpu_s,
        load: None,
    });
}

/// Prints the table on stdout; `with_first` adds the first-call (cold) column.
pub(super) fn print_table(rows: &[Row], with_torch: bool, with_first: bool) {
    let mut out = String::new();
    let opt = |x: Option<f64>, prec: usize| x.map_or("-".into(), |x| format!("{x:.prec$}"));
    out.push_str(&format!("{:<24}", "stage"));
    if with_first {
        out.push_str(&format!(" {:>9}", "first s"));
    }
    out.push_str(&format!(
        " {:>9} {:>9} {:>9} {:>6} {:>9}",
        "best s", "median s", "peak GiB", "cores", "cpu s"
    ));
    if with_torch {
        if with_first {
            out.push_str(&format!(" | {:>9}", "t first s"));
        } else {
            out.push_str(" |");
        }
        out.push_str(&format!(
            " {:>9} {:>9} {:>9} {:>6} | {:>9}",
            "torch s", "median s", "peak GiB", "cores", "ours/torch"
        ));
    }
    out.push('\n');
    for r in rows {
        let mut name = r.stage.to_string();
        if let Some(v) = &r.variant {
            name += &format!(" {v}");
        }
        if r.derived {
            name += " (sum)";
        }
        out.push_str(&format!("{name:<24}"));
        if with_first {
            out.push_str(&format!(" {:>9}", opt(r.ours.first, 3)));
        }
        out.push_str(&format!(
            " {:>9.3} {:>9.3} {:>9} {:>6} {:>9}",
            r.ours.best,
            r.ours.median,
            opt(r.ours.peak_gib, 1),
            opt(r.cores, 2),
            opt(r.cpu_s, 3)
        ));
        if with_torch {
            let t = r.torch.as_ref();
            if with_first {
                out.push_str(&format!(" | {:>9}", opt(t.and_then(|t| t.first), 3)));
            } else {
                out.push_str(" |");
            }
            match t {
                Some(t) => out.push_str(&format!(
                    " {:>9.3} {:>9.3} {:>9} {:>6} | {:>9.2}",
                    t.best,
                    t.median,
                    opt(t.peak_gib, 1),
                    opt(t.cores, 2),
                    r.ours.best / t.best
                )),
                None => out.push_str(&format!(
                    " {:>9} {:>9} {:>9} {:>6} | {:>9}",
                    "-", "-", "-", "-", "-"
                )),
            }
        }
        out.push('\n');
    }
    print!("{out}");
}

pub(super) fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

pub(super) fn json_num(x: Option<f64>) -> String {
    x.filter(|x| x.is_finite())
        .map_or("null".into(), |x| format!("{x:.4}"))
}

fn json_timing(t: &Timing, with_first: bool) -> String {
    let first = if with_first {
        format!(", \"first_s\": {}", json_num(t.first))
    } else {
        String::new()
    };
    format!(
        "{{\"best_s\": {}, \"median_s\": {}, \"peak_rss_gib\": {}, \"cores\": {}{first}}}",
        json_num(Some(t.best)),
        json_num(Some(t.median)),
        json_num(t.peak_gib),
        json_num(t.cores)
    )
}

/// The `rows` array of the JSON report, one row a line.
pub(super) fn json_rows(rows: &[Row], with_first: bool) -> String {
    rows.iter()
        .map(|r| {
            let times: Vec<String> = r.times.iter().map(|t| format!("{t:.4}")).collect();
            format!(
                "    {{\"stage\": {}, \"variant\": {}, \"derived\": {}, \"times_s\": [{}], \"cores\": {}, \"cpu_s\": {}, \"load\": {}, \"ours\": {}, \"torch\": {}}}",
                json_str(r.stage),
                r.variant.as_deref().map_or("null".into(), json_str),
                r.derived,
                times.join(", "),
                json_num(r.cores),
                json_num(r.cpu_s),
                json_num(r.load),
                json_timing(&r.ours, with_first),
                r.torch
                    .as_ref()
                    .map_or("null".into(), |t| json_timing(t, with_first))
            )
        })
        .collect::<Vec<_>>()
        .join(",\n")
}

/// One parsed stage line of a reference script:
/// `label\tmedian_s=..\tmin_s=..\tpeak_rss_gib=..` (optionally `\tfirst_s=..`).
pub(super) fn parse_torch_line(line: &str) -> Option<(String, Timing)> {
    let mut parts = line.split('\t');
    let label = parts.next()?.to_string();
    let mut kv = HashMap::new();
    for p in parts {
        let (k, v) = p.split_once('=')?;
        kv.insert(k, v.parse::<f64>().ok()?);
    }
    Some((
        label,
        Timing {
            best: *kv.get("min_s")?,
            median: *kv.get("median_s")?,
            peak_gib: kv.get("peak_rss_gib").copied(),
            cores: None,
            first: kv.get("first_s").copied(),
        },
    ))
}

/// CPU seconds (user + system) of a running process, from `/proc/<pid>/stat`.
fn child_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    #[cfg(unix)]
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    #[cfg(not(unix))]
    let hz = 100.0;
    Some(ticks / hz)
}

/// `PYTHONPATH` for a reference child process: `dirs` first, then the caller's own.
pub(super) fn python_path(dirs: &[&std::path::Path]) -> std::ffi::OsString {
    let mut parts: Vec<std::ffi::OsString> = dirs.iter().map(|d| d.as_os_str().into()).collect();
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        parts.push(old);
    }
    parts.join(std::ffi::OsStr::new(":"))
}

/// Runs a reference script (`stdin`: its text, for `python -`), echoing its output; returns its
/// first line and its stages, each with the cores its process got while it ran.
pub(super) fn run_reference(
    mut cmd: Command,
    stdin: Option<&str>,
) -> Result<(String, HashMap<String, Timing>)> {
    cmd.stdout(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    if let Some(text) = stdin {
        // Dropped at the end of the statement: the script sees end of file.
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    let stdout = child.stdout.take().expect("piped");
    let mut header = String::new();
    let mut stages = HashMap::new();
    let mut last = (Instant::now(), child_cpu_seconds(child.id()));
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let now = (Instant::now(), child_cpu_seconds(child.id()));
        let cores = last
            .1
            .zip(now.1)
            .map(|(a, b)| (b - a) / (now.0 - last.0).as_secs_f64());
        last = now;
        note(format!("torch: {line}"));
        if header.is_empty() {
            header = line.clone();
        }
        if let Some((label, mut t)) = parse_torch_line(&line) {
            t.cores = cores;
            stages.insert(label, t);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("the PyTorch reference failed ({status})");
    }
    Ok((header, stages))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_lines() {
        let (label, t) =
            parse_torch_line("unet_b2\tmedian_s=31.02\tmin_s=30.50\tpeak_rss_gib=15.8").unwrap();
        assert_eq!(label, "unet_b2");
        assert_eq!((t.best, t.median, t.peak_gib), (30.5, 31.02, Some(15.8)));
        assert_eq!(t.first, None);
        let (_, t) = parse_torch_line(
            "controlnet_b2\tmedian_s=3.00\tmin_s=2.90\tpeak_rss_gib=4.0\tfirst_s=3.50",
        )
        .unwrap();
        assert_eq!(t.first, Some(3.5));
        assert!(parse_torch_line("torch 2.5.1 threads 2 latent 64").is_none());
        assert!(parse_torch_line("built\tpeak_rss_gib=1.0").is_none());
    }

    #[test]
    fn sums_weight_each_part() {
        let t = |s: f64| Timing {
            best: s,
            median: s,
            peak_gib: Some(s),
            cores: None,
            first: Some(s),
        };
        let s = sum_timings(&[(&t(2.0), 2.0), (&t(5.0), 1.0)]);
        assert_eq!(
            (s.best, s.median, s.first, s.peak_gib),
            (9.0, 9.0, Some(9.0), Some(5.0))
        );
    }

    #[test]
    fn names_the_cpu() {
        let d = cpu_description();
        assert!(d.contains("AVX-512F") && d.contains("AVX2"), "{d}");
    }
}
