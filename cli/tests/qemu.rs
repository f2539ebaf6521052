//! End to end on emulated hardware: the built-in server, the gateway, an lm3s6965evb
//! (Cortex-M3) and a micro:bit (Cortex-M0) running examples/firmware-pump, an lm3s6965evb
//! running examples/firmware-embassy, and a host client, all contending for "pump"; then the
//! same three boards on protocol v2 sessions, holding "pump" and "valve". Also: the release
//! firmwares contain no panic path, and their sizes. `LEASEHOLD_QEMU_LOG=FILE` keeps the
//! session test's merged log.
//!
//! Needs `qemu-system-arm` and the `thumbv7m-none-eabi` and `thumbv6m-none-eabi` targets
//! (`bash scripts/setup.sh`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use leasehold_http::{BuiltinBackend, Client, Options, ReleaseError};
use leasehold_server::{Server, ServerConfig};

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");
const TTL: Duration = Duration::from_millis(1_000);
/// The lease's drift bound ε (the core's default, which the firmware uses).
const EPSILON: f64 = 0.01;
/// The micro:bit firmware's flash budget, and flash plus stack (issue 12).
const M0_FLASH_BUDGET: u64 = 16 * 1024;
const M0_FLASH_AND_STACK_BUDGET: u64 = 18 * 1024;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One firmware build, for one QEMU machine.
struct Firmware {
    /// The crate under examples/ (and its binary).
    krate: &'static str,
    /// QEMU's `-M`.
    machine: &'static str,
    target: &'static str,
    /// Cargo arguments choosing the board.
    features: &'static [&'static str],
    /// Panic entry points allowed to remain (see [`Elf::panic_paths`]).
    allowed_panics: &'static [&'static str],
    /// The crate's target directory under its folder: a build with other features gets its
    /// own, so that it never overwrites another build's ELF.
    target_dir: &'static str,
    /// Held to the micro:bit's flash budget (the v1 pump; the session pump is measured only).
    m0_budget: bool,
}

impl Firmware {
    fn name(&self) -> String {
        let sessions = if self.features.iter().any(|f| f.contains("sessions")) { " (sessions)" } else { "" };
        format!("{}{sessions} on {}", self.krate, self.machine)
    }
}

const LM3S: Firmware = Firmware {
    krate: "firmware-pump",
    machine: "lm3s6965evb",
    target: "thumbv7m-none-eabi",
    features: &[],
    allowed_panics: &[],
    target_dir: "target",
    m0_budget: false,
};
const MICROBIT: Firmware = Firmware {
    krate: "firmware-pump",
    machine: "microbit",
    target: "thumbv6m-none-eabi",
    features: &["--no-default-features", "--features", "microbit"],
    allowed_panics: &[],
    target_dir: "target",
    m0_budget: true,
};
/// Every `async fn` state machine panics if polled after it completed, and the compiler
/// cannot prove an executor never does: that entry point stays, and nothing else may.
const EMBASSY: Firmware = Firmware {
    krate: "firmware-embassy",
    machine: "lm3s6965evb",
    target: "thumbv7m-none-eabi",
    features: &[],
    allowed_panics: &["panic_const_async_fn_resumed"],
    target_dir: "target",
    m0_budget: false,
};
const FIRMWARES: [&Firmware; 3] = [&LM3S, &MICROBIT, &EMBASSY];
/// The pump on protocol v2 (firmware-pump's `sessions` feature): two keys in one session.
const SESSION_LM3S: Firmware = Firmware {
    krate: "firmware-pump",
    machine: "lm3s6965evb",
    target: "thumbv7m-none-eabi",
    features: &["--features", "sessions"],
    allowed_panics: &[],
    target_dir: "target/sessions",
    m0_budget: false,
};
/// The same on the micro:bit: built and checked for panic paths, its size reported (it does
/// not fit the 16 KiB budget).
const SESSION_MICROBIT: Firmware = Firmware {
    krate: "firmware-pump",
    machine: "microbit",
    target: "thumbv6m-none-eabi",
    features: &["--no-default-features", "--features", "microbit,sessions"],
    allowed_panics: &[],
    target_dir: "target/sessions",
    m0_budget: false,
};
/// The embassy pump on protocol v2 (firmware-embassy's `sessions` feature): the same two
/// keys through the async session link; the same `async fn` guard as [`EMBASSY`].
const SESSION_EMBASSY: Firmware = Firmware {
    krate: "firmware-embassy",
    machine: "lm3s6965evb",
    target: "thumbv7m-none-eabi",
    features: &["--features", "sessions"],
    allowed_panics: &["panic_const_async_fn_resumed"],
    target_dir: "target/sessions",
    m0_budget: false,
};
/// Every release firmware checked for panic paths and measured.
const RELEASES: [&Firmware; 6] =
    [&LM3S, &MICROBIT, &EMBASSY, &SESSION_LM3S, &SESSION_MICROBIT, &SESSION_EMBASSY];

/// Builds the release firmware (once per test binary) and returns its ELF.
fn build(fw: &Firmware) -> PathBuf {
    static BUILT: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples").join(fw.krate);
    let elf = dir.join(fw.target_dir).join(fw.target).join("release").join(fw.krate);
    if built.contains(&fw.name()) {
        return elf;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--target", fw.target, "--target-dir", fw.target_dir])
        .args(fw.features)
        .current_dir(&dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "building {} failed (is the target installed? `rustup target add {}`):\n{}",
        fw.name(),
        fw.target,
        String::from_utf8_lossy(&out.stderr)
    );
    built.insert(fw.name());
    elf
}

// ----- A 32-bit little-endian ELF: section sizes, symbols, and Thumb calls -----

struct Section {
    name: String,
    addr: u32,
    offset: usize,
    size: usize,
}

struct Symbol {
    /// Mangled.
    name: String,
    /// Without the Thumb bit.
    addr: u32,
    size: u32,
}

struct Elf {
    bytes: Vec<u8>,
    sections: Vec<Section>,
    symbols: Vec<Symbol>,
}

fn elf(path: &Path) -> Elf {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(b.starts_with(b"\x7fELF\x01\x01"), "{} is not a 32-bit little-endian ELF", path.display());
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let cstr = |o: usize| {
        let end = b[o..].iter().position(|&c| c == 0).map_or(b.len(), |n| o + n);
        String::from_utf8_lossy(&b[o..end]).into_owned()
    };
    let (shoff, shentsize, shnum, shstrndx) = (u32_at(0x20), u16_at(0x2E), u16_at(0x30), u16_at(0x32));
    // (name offset, type, address, file offset, size, link) of each section header.
    let headers: Vec<[usize; 6]> = (0..shnum)
        .map(|i| {
            let h = shoff + i * shentsize;
            [u32_at(h), u32_at(h + 4), u32_at(h + 12), u32_at(h + 16), u32_at(h + 20), u32_at(h + 24)]
        })
        .collect();
    let names_at = headers[shstrndx][3];
    let sections = headers
        .iter()
        .map(|h| Section { name: cstr(names_at + h[0]), addr: h[2] as u32, offset: h[3], size: h[4] })
        .collect();
    const SHT_SYMTAB: usize = 2;
    let mut symbols = Vec::new();
    for h in headers.iter().filter(|h| h[1] == SHT_SYMTAB) {
        let strings_at = headers[h[5]][3];
        for sym in (h[3]..h[3] + h[4]).step_by(16) {
            symbols.push(Symbol {
                name: cstr(strings_at + u32_at(sym)),
                addr: u32_at(sym + 4) as u32 & !1,
                size: u32_at(sym + 8) as u32,
            });
        }
    }
    Elf { bytes: b, sections, symbols }
}

/// Symbols of core's panic machinery (`core::panicking::*`, the slice index and length
/// failures, `unwrap`/`expect` failures) and the panic handler. Every panic goes through one
/// of them, and all are `#[inline(never)]`.
const PANIC_MARKS: [&str; 8] = [
    "panic",
    "rust_begin_unwind",
    "index_fail",
    "len_fail",
    "mismatch_fail",
    "overflow_fail",
    "unwrap_failed",
    "expect_failed",
];
/// Where every panic ends: `panic_fmt` and the handler.
const PANIC_SINKS: [&str; 2] = ["9panic_fmt", "rust_begin_unwind"];

impl Elf {
    fn size(&self, names: &[&str]) -> u64 {
        self.sections.iter().filter(|s| names.contains(&s.name.as_str())).map(|s| s.size as u64).sum()
    }
    /// What is programmed into flash: the vector table, code, constants and .data's image.
    fn flash(&self) -> u64 {
        self.size(&[".vector_table", ".text", ".rodata", ".data"])
    }
    /// RAM used before the stack.
    fn static_ram(&self) -> u64 {
        self.size(&[".data", ".bss", ".uninit"])
    }

    /// Every Thumb-2 `bl` and `b.w` in .text, as (address, target). Each halfword is tried as
    /// the start of one, so data and misaligned decodes can add spurious pairs, never lose a
    /// real call: the check below can only err on the side of reporting.
    fn calls(&self) -> Vec<(u32, u32)> {
        let Some(text) = self.sections.iter().find(|s| s.name == ".text") else { return Vec::new() };
        let code = &self.bytes[text.offset..text.offset + text.size];
        let hw = |i: usize| u32::from(u16::from_le_bytes([code[i], code[i + 1]]));
        let mut calls = Vec::new();
        for i in (0..code.len().saturating_sub(3)).step_by(2) {
            let (h1, h2) = (hw(i), hw(i + 2));
            // 11110 S imm10 : 1 1 J1 1 J2 imm11 (bl) or 1 0 J1 1 J2 imm11 (b.w, T4).
            if h1 >> 11 != 0b11110 || (h2 >> 14) & 1 != 1 || (h2 >> 12) & 1 != 1 {
                continue;
            }
            let s = (h1 >> 10) & 1;
            let (j1, j2) = ((h2 >> 13) & 1, (h2 >> 11) & 1);
            let (i1, i2) = (!(j1 ^ s) & 1, !(j2 ^ s) & 1);
            let imm = (s << 24) | (i1 << 23) | (i2 << 22) | ((h1 & 0x3FF) << 12) | ((h2 & 0x7FF) << 1);
            let offset = ((imm << 7) as i32) >> 7; // sign-extend 25 bits
            let at = text.addr + i as u32;
            calls.push((at, at.wrapping_add(4).wrapping_add(offset as u32)));
        }
        calls
    }

    fn symbol_at(&self, addr: u32) -> Option<&Symbol> {
        self.symbols.iter().filter(|s| s.size > 0).find(|s| s.addr <= addr && addr < s.addr + s.size)
    }

    /// What can still panic: panic entry points present other than `allowed` ones, and any
    /// call into `panic_fmt` or the handler from outside the panic machinery (a `panic!` in
    /// our code or a dependency's). With nothing allowed, any panic symbol at all.
    fn panic_paths(&self, allowed: &[&str]) -> Vec<String> {
        let is_panic = |name: &str| PANIC_MARKS.iter().any(|m| name.contains(m));
        let mut paths: Vec<String> = self
            .symbols
            .iter()
            .map(|s| s.name.as_str())
            .filter(|&n| is_panic(n))
            .filter(|&n| allowed.is_empty() || !PANIC_SINKS.iter().chain(allowed).any(|a| n.contains(a)))
            .map(|n| format!("linked: {n}"))
            .collect();
        let sinks: Vec<&Symbol> =
            self.symbols.iter().filter(|s| PANIC_SINKS.iter().any(|m| s.name.contains(m))).collect();
        for (at, to) in self.calls() {
            let Some(sink) = sinks.iter().find(|s| s.addr == to) else { continue };
            let caller = self.symbol_at(at).map_or("?", |s| s.name.as_str());
            if !is_panic(caller) {
                paths.push(format!("call at {at:#x} in {caller} to {}", sink.name));
            }
        }
        paths.sort();
        paths.dedup();
        paths
    }
}

#[test]
fn release_firmwares_have_no_panic_path() {
    for fw in RELEASES {
        let path = build(fw);
        let elf = elf(&path);
        // The check must be able to see: a stripped ELF would pass vacuously.
        for known in ["Reset", "main", "DefaultHandler"] {
            assert!(
                elf.symbols.iter().any(|s| s.name == known),
                "{}: no symbol {known} in {} (stripped?)",
                fw.name(),
                path.display()
            );
        }
        let panics = elf.panic_paths(fw.allowed_panics);
        assert!(
            panics.is_empty(),
            "the {} release firmware has a panic path: {panics:#?}\nfind the callers with \
             `llvm-objdump -d -C {}` (look for `bl` to these) and `llvm-addr2line -f -i -C -e ELF ADDR`",
            fw.name(),
            path.display()
        );
        // And the call scan must see calls: Reset calls main, and an allowed panic entry, if
        // linked, calls into panic_fmt (so a call from anywhere else would be seen too).
        let main = elf.symbols.iter().find(|s| s.name == "main").unwrap().addr;
        assert!(elf.calls().iter().any(|c| c.1 == main), "{}: no call to main found", fw.name());
        for allowed in fw.allowed_panics.iter().filter(|a| elf.symbols.iter().any(|s| s.name.contains(*a))) {
            let into_sink = elf.calls().into_iter().filter(|&(at, to)| {
                let caller = elf.symbol_at(at).is_some_and(|s| s.name.contains(allowed));
                caller && elf.symbols.iter().any(|s| s.addr == to && s.name.contains(PANIC_SINKS[0]))
            });
            assert!(into_sink.count() > 0, "{}: {allowed} seen calling nothing", fw.name());
        }
        println!(
            "{} ({}): flash {} B (.vector_table+.text+.rodata+.data), static RAM {} B (.data+.bss+.uninit), no panic path{}",
            fw.name(),
            fw.target,
            elf.flash(),
            elf.static_ram(),
            if fw.allowed_panics.is_empty() { String::new() } else { format!(" but {:?}", fw.allowed_panics) }
        );
        if fw.m0_budget {
            assert!(elf.flash() <= M0_FLASH_BUDGET, "micro:bit flash {} B over budget", elf.flash());
        }
    }
}

// ----- The end-to-end run -----

/// One line of anyone's log, stamped with host time on arrival.
#[derive(Debug, Clone)]
struct Line {
    t: Duration,
    who: String,
    text: String,
}

/// Starts a board; returns it and the TCP port of its UART.
fn board(fw: &Firmware, elf: &Path, device: u32, log: Arc<Mutex<Vec<Line>>>, start: Instant) -> (Proc, u16) {
    let mut child = Command::new("qemu-system-arm")
        .args(["-M", fw.machine, "-nographic", "-monitor", "none"])
        .args(["-semihosting-config", "enable=on,target=native"])
        .args(["-serial", "tcp:127.0.0.1:0,server=on,wait=on,nodelay=on", "-kernel"])
        .arg(elf)
        // The third number asks the pump firmware to replay one stale actuator command (the
        // embassy firmware ignores it).
        .args(["-append", &format!("{device} {} 1", std::process::id())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start qemu-system-arm ({e}); install it: apt-get install qemu-system-arm")
        });
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    // "waiting for connection on: disconnected:tcp:127.0.0.1:NNNNN,server=on": the last
    // 127.0.0.1:N of the line (the microbit's first repeats the requested :0 before it).
    let port = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "qemu -M {} exited before listening", fw.machine);
        if let Some(p) = line
            .rsplit("127.0.0.1:")
            .next()
            .and_then(|r| r.split(',').next())
            .and_then(|p| p.trim().parse().ok())
            .filter(|&p| p != 0)
        {
            break p;
        }
    };
    let out = child.stdout.take().unwrap();
    let who = format!("board{device}");
    std::thread::spawn(move || {
        for text in BufReader::new(out).lines().map_while(Result::ok) {
            log.lock().unwrap().push(Line { t: start.elapsed(), who: who.clone(), text });
        }
    });
    (Proc(child), port)
}

/// The merged log, for failure messages.
fn render(lines: &[Line]) -> String {
    lines
        .iter()
        .map(|l| format!("{:>8.3}s {:<7} {}", l.t.as_secs_f64(), l.who, l.text))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `who` is early in a hold (one of its first six actions: at least two more are
/// due, so a kill lands mid-hold, and a busy host that misses one still catches a later one)
/// and has renewed at least once (for its round-trip figure), then kills it. Returns when.
fn kill_mid_hold(proc: &mut Proc, who: &str, log: &Mutex<Vec<Line>>, start: Instant) -> Duration {
    let deadline = start.elapsed() + Duration::from_secs(20);
    loop {
        let holding = {
            let l = log.lock().unwrap();
            let renewed = l.iter().any(|x| x.who == who && x.text.starts_with("RENEWED"));
            let last = l.iter().rev().find(|x| x.who == who && x.text.starts_with(['A', 'L', 'R']));
            renewed
                && last.is_some_and(|x| {
                    let mut w = x.text.split_whitespace();
                    w.next() == Some("ACT")
                        && w.nth(1).and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n <= 6)
                })
        };
        if holding {
            let _ = proc.0.kill();
            return start.elapsed();
        }
        assert!(start.elapsed() < deadline, "{who} never held the lease:\n{}", render(&log.lock().unwrap()));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The rate of `who`'s clock against the host's, from its CLOCK lines. Each line reaches the
/// host some delay after the device stamped it; a loaded host delays some more than others. The
/// line of least delay in the first third and in the last third (the smallest host-minus-device
/// offset) bound the rate best, since delays only ever add to the host's side.
fn clock_rate(lines: &[Line], who: &str) -> (f64, f64) {
    // (host seconds, device seconds)
    let clocks: Vec<(f64, f64)> = lines
        .iter()
        .filter(|l| l.who == who)
        .filter_map(|l| {
            let dev = l.text.strip_prefix("CLOCK ")?.parse::<u64>().ok()?;
            Some((l.t.as_secs_f64(), dev as f64 / 1e6))
        })
        .collect();
    assert!(clocks.len() >= 3, "{who} reported its clock {} times:\n{}", clocks.len(), render(lines));
    let third = clocks.len() / 3;
    let least_delay =
        |c: &[(f64, f64)]| *c.iter().min_by(|a, b| (a.0 - a.1).total_cmp(&(b.0 - b.1))).unwrap();
    let (a, b) = (least_delay(&clocks[..third.max(1)]), least_delay(&clocks[clocks.len() - third.max(1)..]));
    ((b.1 - a.1) / (b.0 - a.0), b.0 - a.0)
}

#[test]
fn boards_and_a_host_share_one_lease_safely() {
    let boards: Vec<(&Firmware, PathBuf)> = FIRMWARES.iter().map(|&fw| (fw, build(fw))).collect();
    let start = Instant::now();
    let log: Arc<Mutex<Vec<Line>>> = Arc::default();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).unwrap();
    // board1: firmware-pump on the lm3s6965evb, board2: on the micro:bit, board3: firmware-embassy.
    let mut running: Vec<(String, &Firmware, Proc)> = Vec::new();
    let mut gateway = Command::new(BIN);
    gateway.args(["gateway", "--server", &server.url()]);
    for (i, (fw, elf)) in boards.iter().enumerate() {
        let device = i as u32 + 1;
        let (proc, port) = board(fw, elf, device, log.clone(), start);
        gateway.args(["--link", &format!("tcp:127.0.0.1:{port}")]);
        running.push((format!("board{device}"), fw, proc));
    }
    let _gateway = Proc(gateway.stderr(Stdio::null()).spawn().unwrap());

    // The host client contends too, logging its actions like the boards.
    let stop = Arc::new(AtomicBool::new(false));
    let host = {
        let (log, stop, url) = (log.clone(), stop.clone(), server.url());
        std::thread::spawn(move || {
            let backend = BuiltinBackend::new(&url, None, Duration::from_millis(300)).unwrap();
            let client = Client::new(backend, Options::new(TTL)).unwrap();
            let say = |text: String| {
                log.lock().unwrap().push(Line { t: start.elapsed(), who: "host".into(), text })
            };
            smol::block_on(async {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(lease) = client.acquire_timeout("pump", Duration::from_millis(500)).await else {
                        continue;
                    };
                    let fence = lease.fence().map_or(0, |f| f.0);
                    say(format!("ACQUIRED {fence}"));
                    for n in 1..=5 {
                        if lease.remaining().is_none_or(|r| r < Duration::from_millis(50)) {
                            break;
                        }
                        say(format!("ACT {fence} {n}"));
                        async_io::Timer::after(Duration::from_millis(100)).await;
                    }
                    // A grant lost, or a release the server did not acknowledge before the
                    // grant ran out (a loaded machine), frees the key by expiry instead:
                    // still safe, and what the fenced log below checks either way.
                    match lease.release().await {
                        Ok(()) => say(format!("RELEASED {fence}")),
                        Err(ReleaseError::NotAcknowledged { .. }) => say(format!("EXPIRED {fence}")),
                        Err(ReleaseError::Lost { .. }) => say(format!("LOST {fence}")),
                        Err(e) => panic!("release: {e}"),
                    }
                    async_io::Timer::after(Duration::from_millis(300)).await;
                }
            });
        })
    };

    // Let everyone take turns, then kill each board in turn while it holds the lease, the
    // last started first: every firmware's hand-over is measured.
    std::thread::sleep(Duration::from_secs(4));
    let mut kills: Vec<(String, &Firmware, Duration)> = Vec::new();
    for (who, fw, mut proc) in running.drain(..).rev() {
        let at = kill_mid_hold(&mut proc, &who, &log, start);
        kills.push((who, fw, at));
        std::thread::sleep(Duration::from_secs(3));
    }
    stop.store(true, Ordering::SeqCst);
    host.join().unwrap();

    let lines = log.lock().unwrap().clone();
    let dump = || render(&lines);

    // The fenced log: every ACT names its fence. One party per fence, fences in order, and
    // the spans of consecutive fences never overlap in (host) time.
    let acts: Vec<(Duration, &str, u64)> = lines
        .iter()
        .filter_map(|l| {
            let mut w = l.text.split_whitespace();
            (w.next() == Some("ACT"))
                .then(|| (l.t, l.who.as_str(), w.next().and_then(|f| f.parse().ok()).unwrap_or(0)))
        })
        .collect();
    // (fence, party, first action, last action)
    let mut spans: Vec<(u64, &str, Duration, Duration)> = Vec::new();
    for (t, who, fence) in &acts {
        match spans.last_mut() {
            Some(s) if s.0 == *fence => {
                assert_eq!(s.1, *who, "fence {fence} used by two parties:\n{}", dump());
                s.3 = *t;
            }
            _ => {
                if let Some(prev) = spans.last() {
                    assert!(*fence > prev.0, "fence {fence} acted after fence {}:\n{}", prev.0, dump());
                }
                spans.push((*fence, who, *t, *t));
            }
        }
    }
    // How close the hand-overs came, as seen by the host: the margin the order above had.
    if let Some(gap) = spans.windows(2).map(|w| w[1].2.saturating_sub(w[0].3)).min() {
        println!(
            "{} holdings; closest hand-over: {:.1} ms from one fence's last action to the next one's first",
            spans.len(),
            gap.as_secs_f64() * 1e3
        );
    }
    // The actuator's own fence check: each pump board replays one command under its previous
    // grant's fence just after acting under a newer one (if it was granted twice before it was
    // killed). It must be refused, and nothing under the stale fence acted after it.
    let mut refusals = 0;
    for l in lines.iter().filter(|l| l.text.starts_with("REFUSED")) {
        let nums: Vec<u64> = l.text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        let [stale, high] = nums[..] else { panic!("unreadable refusal {:?}:\n{}", l.text, dump()) };
        assert!(stale < high, "refused fence {stale} is not below {high}:\n{}", dump());
        let acted_late = lines.iter().any(|a| {
            a.who == l.who && a.t >= l.t && a.text.split_whitespace().take(2).eq(["ACT", &stale.to_string()])
        });
        assert!(!acted_late, "{} acted under fence {stale} after refusing it:\n{}", l.who, dump());
        refusals += 1;
    }
    for who in ["board1", "board2"] {
        let fences: Vec<u64> = acts.iter().filter(|a| a.1 == who).map(|a| a.2).collect();
        assert!(
            fences.is_sorted(),
            "{who}'s actuator acted under a lower fence after a higher one: {fences:?}"
        );
    }
    assert!(refusals >= 1, "no pump board refused its replayed stale command:\n{}", dump());
    println!("{refusals} stale actuator command(s) refused by the pump's fence check");
    let parties: BTreeSet<&str> = spans.iter().map(|s| s.1).collect();
    assert!(
        parties.len() == boards.len() + 1,
        "every board and the host should have held the lease: {parties:?}\n{}",
        dump()
    );

    let bound = TTL.mul_f64(1.0 + EPSILON);
    for (who, fw, killed_at) in &kills {
        println!("--- {who}: {}", fw.name());
        // Failover after the emulator was killed: the next party's grant.
        let next = lines
            .iter()
            .find(|l| l.t > *killed_at && l.who != *who && l.text.starts_with("ACQUIRED"))
            .unwrap_or_else(|| panic!("nobody acquired after killing {who}:\n{}", dump()));
        let failover = next.t - *killed_at;
        println!(
            "failover after killing it: {:.3}s to {} (bound ttl*(1+eps) = {:.3}s, ratio {:.2})",
            failover.as_secs_f64(),
            next.who,
            bound.as_secs_f64(),
            failover.as_secs_f64() / bound.as_secs_f64()
        );
        // Slack: the host's busy poll and the boards' 1 ms tick.
        assert!(failover <= bound + Duration::from_millis(200), "failover {failover:?}:\n{}", dump());

        // The board's clock must run within ε of the host's for the safety argument to hold.
        let (rate, over) = clock_rate(&lines, who);
        println!("clock rate vs host: {rate:.4} over {over:.1}s");
        assert!((rate - 1.0).abs() < EPSILON, "{who} clock runs at {rate} of host time:\n{}", dump());

        let mut rtts: Vec<u64> = lines
            .iter()
            .filter(|l| l.who == *who)
            .filter_map(|l| l.text.strip_prefix("RENEWED rtt_us ").and_then(|v| v.parse().ok()))
            .collect();
        rtts.sort_unstable();
        assert!(!rtts.is_empty(), "{who} never renewed:\n{}", dump());
        println!(
            "renewal round trip device -> gateway -> server -> device: min {:.2} ms, median {:.2} ms, max {:.2} ms over {}",
            rtts[0] as f64 / 1e3,
            rtts[rtts.len() / 2] as f64 / 1e3,
            rtts[rtts.len() - 1] as f64 / 1e3,
            rtts.len()
        );

        // Stack: painted at boot, the deepest overwrite read back every second.
        let stack = lines
            .iter()
            .filter(|l| l.who == *who)
            .filter_map(|l| l.text.strip_prefix("STACK ").and_then(|v| v.parse::<u64>().ok()))
            .max()
            .unwrap_or_else(|| panic!("{who} reported no stack high-water mark:\n{}", dump()));
        let e = elf(&boards.iter().find(|b| b.0.name() == fw.name()).unwrap().1);
        println!(
            "flash {} B, static RAM {} B, stack high-water mark {stack} B (flash + stack {} B)",
            e.flash(),
            e.static_ram(),
            e.flash() + stack
        );
        if fw.m0_budget {
            assert!(
                e.flash() + stack <= M0_FLASH_AND_STACK_BUDGET,
                "micro:bit flash + stack {} B over budget",
                e.flash() + stack
            );
        }
    }
}

// ----- Protocol v2: two session boards contend for "pump" and "valve" -----

/// The session pump's ttl and keepalive interval (examples/firmware-pump/src/sessions.rs).
const SESSION_TTL: Duration = Duration::from_millis(4_000);
const KEEPALIVE_EVERY: Duration = Duration::from_millis(1_000);
/// The longest the gateway holds a waiter's keepalive (a quarter of the session's ttl).
const HOLD: Duration = Duration::from_millis(1_000);
/// A pushed hand-off comes well inside a keepalive interval; a waiter that learnt of its grant
/// at its next keepalive would be half an interval late on average.
const PUSHED_HAND_OFF: Duration = Duration::from_millis(250);
/// Liveness deadlines on a loaded machine, never the measured bounds.
const PATIENCE: Duration = Duration::from_secs(40);

/// Polls the log until `found` finds something in it.
fn wait_for<T>(log: &Mutex<Vec<Line>>, what: &str, found: impl Fn(&[Line]) -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(t) = found(&log.lock().unwrap()) {
            return t;
        }
        assert!(Instant::now() < deadline, "no {what} in time:\n{}", render(&log.lock().unwrap()));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `who`'s lines after `after`, split into words.
fn said<'l>(
    lines: &'l [Line],
    who: &'l str,
    after: Duration,
) -> impl Iterator<Item = (Duration, Vec<&'l str>)> + 'l {
    lines
        .iter()
        .filter(move |l| l.who == who && l.t > after)
        .map(|l| (l.t, l.text.split_whitespace().collect()))
}

/// The numbers of a line's words that are numbers.
fn nums(words: &[&str]) -> Vec<u64> {
    words.iter().filter_map(|w| w.parse().ok()).collect()
}

/// A hand-over of "pump" by release: `from` logged `RELEASING pump` at `released`, just before
/// sending the release, then `to`, queued for it before that, logged `ACQUIRED pump` at
/// `acquired`.
#[derive(Debug, Clone)]
struct HandOff {
    from: String,
    to: String,
    released: Duration,
    acquired: Duration,
}

/// The first hand-over of "pump" by release after `after`.
fn hand_off(lines: &[Line], after: Duration) -> Option<HandOff> {
    let release = lines.iter().find(|l| l.t > after && l.text.starts_with("RELEASING pump "))?;
    let grant = lines
        .iter()
        .find(|l| l.t >= release.t && l.who != release.who && l.text.starts_with("ACQUIRED pump "))?;
    Some(HandOff { from: release.who.clone(), to: grant.who.clone(), released: release.t, acquired: grant.t })
}

/// The first board other than `not` to log HOLDING after `after`: who, when, and its (pump,
/// valve) fences.
fn holding_by_other(lines: &[Line], not: &str, after: Duration) -> Option<(String, Duration, u64, u64)> {
    let who = &lines.iter().find(|l| l.t > after && l.who != not && l.text.starts_with("HOLDING"))?.who;
    holding(lines, who, after).map(|(t, pump, valve)| (who.clone(), t, pump, valve))
}

/// When `who` next logged HOLDING after `after`, with its (pump, valve) fences.
fn holding(lines: &[Line], who: &str, after: Duration) -> Option<(Duration, u64, u64)> {
    said(lines, who, after).find(|(_, w)| w.first() == Some(&"HOLDING")).and_then(|(t, w)| match nums(&w)[..]
    {
        [pump, valve] => Some((t, pump, valve)),
        _ => None,
    })
}

/// The number of `who`'s last action after `after` ("ACT PUMP VALVE N").
fn last_act(lines: &[Line], who: &str, after: Duration) -> Option<u64> {
    said(lines, who, after)
        .filter(|(_, w)| w.first() == Some(&"ACT"))
        .last()
        .and_then(|(_, w)| w.get(3)?.parse().ok())
}

/// The gateway's forwarded-request counter of the link to QEMU's UART at `uart`.
fn forwarded(metrics: u16, uart: u16) -> u64 {
    let series = format!("leasehold_gateway_requests_forwarded_total{{link=\"tcp:127.0.0.1:{uart}\"}}");
    leasehold_test_servers::metric(metrics, &series).unwrap_or_else(|| panic!("no {series} on /metrics"))
}

/// Three boards on the session pump, an lm3s6965evb (board1) and a micro:bit (board2) on
/// firmware-pump's blocking link and an lm3s6965evb on firmware-embassy's async one (board3),
/// through the real gateway and the real built-in server: hand-offs by release are pushed, one
/// keepalive a period renews both keys, a killed holder's keys go to the next waiter at its
/// session's expiry and not before, every board holds both keys, and every fence rises.
/// `config` may plant a bug in the server, `gateway_fault` one in the gateway.
fn session_boards(config: impl FnOnce(&mut ServerConfig), gateway_fault: &str) {
    let firmwares = [&SESSION_LM3S, &SESSION_MICROBIT, &SESSION_EMBASSY];
    let images: Vec<PathBuf> = firmwares.iter().map(|fw| build(fw)).collect();
    let start = Instant::now();
    let log: Arc<Mutex<Vec<Line>>> = Arc::default();
    let dir = tempfile::tempdir().unwrap();
    let mut server_config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    config(&mut server_config);
    let server = Server::spawn(server_config).unwrap();
    let mut boards: Vec<(String, Option<Proc>, u16)> = Vec::new();
    let mut gateway = Command::new(BIN);
    gateway.args(["gateway", "--server", &server.url(), "--metrics", "127.0.0.1:0"]);
    gateway.env("LEASEHOLD_GATEWAY_FAULT", gateway_fault);
    for (i, (fw, image)) in firmwares.iter().zip(&images).enumerate() {
        let device = i as u32 + 1;
        let (proc, port) = board(fw, image, device, log.clone(), start);
        gateway.args(["--link", &format!("tcp:127.0.0.1:{port}")]);
        boards.push((format!("board{device}"), Some(proc), port));
    }
    let mut gateway = Proc(gateway.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap());
    let mut line = String::new();
    BufReader::new(gateway.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let metrics = line
        .trim()
        .strip_prefix("metrics on http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("gateway said {line:?}"))
        .port();
    let uart = |who: &str| boards.iter().find(|b| b.0 == who).unwrap().2;

    // The first hand-off by release; then the new holder's holding, with the requests both
    // links sent over most of it.
    let first = wait_for(&log, "hand-off of the pump", |l| hand_off(l, Duration::ZERO));
    let (holder, waiter) = (first.to.clone(), first.from.clone());
    let (held_at, ..) = wait_for(&log, "holding of both keys", |l| holding(l, &holder, first.acquired));
    wait_for(&log, "third action", |l| last_act(l, &holder, held_at).filter(|&n| n >= 3));
    let (t1, holder1, waiter1) =
        (start.elapsed(), forwarded(metrics, uart(&holder)), forwarded(metrics, uart(&waiter)));
    wait_for(&log, "43rd action", |l| last_act(l, &holder, held_at).filter(|&n| n >= 43));
    let (t2, holder2, waiter2) =
        (start.elapsed(), forwarded(metrics, uart(&holder)), forwarded(metrics, uart(&waiter)));

    // The pump goes back by release, then the first holder is killed mid-hold, once it has
    // renewed in that holding.
    let second = wait_for(&log, "second hand-off", |l| hand_off(l, t2));
    let victim = second.to.clone();
    let (victim_held_at, victim_pump, victim_valve) =
        wait_for(&log, "the victim's holding", |l| holding(l, &victim, second.acquired));
    wait_for(&log, "a renewal mid-hold", |l| {
        let renewed = said(l, &victim, victim_held_at).any(|(_, w)| w.first() == Some(&"RENEWED"));
        (renewed && last_act(l, &victim, victim_held_at).is_some_and(|n| (2..=40).contains(&n))).then_some(())
    });
    boards.iter_mut().find(|b| b.0 == victim).unwrap().1.take();
    let killed_at = start.elapsed();
    // The server's own view of the dead session's expiry, the latest it reported before the
    // takeover. A held keepalive renews its session when it is answered, up to a hold after
    // the board sent it, and one may still be held when the board dies: the board's log
    // alone cannot tell a grant at the expiry from one a quarter of a ttl early.
    let victim_label = format!("pump-{}", victim.trim_start_matches("board"));
    let expiry_seen = std::cell::Cell::new(None::<Duration>);
    let (survivor, taken_at, survivor_pump, survivor_valve) = wait_for(&log, "takeover", |l| {
        let asked = start.elapsed();
        let seen = leasehold_test_servers::http_get(server.addr().port(), "/v2/leases")
            .and_then(|r| serde_json::from_str::<serde_json::Value>(r.split_once("\r\n\r\n")?.1).ok());
        let remaining = seen
            .iter()
            .flat_map(|v| v["leases"].as_array().into_iter().flatten())
            .filter_map(|k| k.get("holder"))
            .filter(|h| h["label"] == victim_label.as_str())
            .filter_map(|h| h["remaining"].as_u64())
            .max();
        if let Some(r) = remaining {
            let expiry = asked + Duration::from_micros(r);
            expiry_seen.set(Some(expiry_seen.get().map_or(expiry, |e: Duration| e.max(expiry))));
        }
        holding_by_other(l, &victim, killed_at)
    });
    wait_for(&log, "the survivor's actions", |l| last_act(l, &survivor, taken_at).filter(|&n| n >= 3));
    drop(boards);
    drop(gateway);
    let lines = log.lock().unwrap().clone();
    let dump = || render(&lines);
    if let Some(path) = std::env::var_os("LEASEHOLD_QEMU_LOG") {
        std::fs::write(path, dump()).unwrap();
    }

    // A waiter's keepalive is held until its grant or the hold's end: about one request per
    // hold, plus its acquire. A waiter polling for its grant would send one per round trip.
    let window = t2 - t1;
    let waiter_requests = waiter2 - waiter1;
    let allowed = (window.as_secs_f64() / HOLD.as_secs_f64()) as u64 + 3;
    assert!(
        waiter_requests <= allowed,
        "waiter sent {waiter_requests} requests in {window:?} while it waited (at most {allowed}):\n{}",
        dump()
    );
    // One keepalive frame a period renews both of the holder's keys. A holder that waits for
    // nothing sends its keepalives at least `renew_every` apart (the core's rule), so a window
    // holds at most ⌊window / interval⌋ + 1 of them; one keepalive per key would be twice that.
    let holder_requests = holder2 - holder1;
    let per_interval = (window.as_secs_f64() / KEEPALIVE_EVERY.as_secs_f64()) as u64 + 1;
    let renewals =
        said(&lines, &holder, t1).filter(|(t, w)| *t <= t2 && w.first() == Some(&"RENEWED")).count();
    println!(
        "while {holder} held pump and valve: {holder_requests} requests forwarded in {:.2} s (one keepalive per {:?}: at most {per_interval}), {renewals} renewals in its log; {waiter} waiting: {waiter_requests} requests",
        window.as_secs_f64(),
        KEEPALIVE_EVERY
    );
    assert!(
        (1..=per_interval).contains(&holder_requests),
        "{holder} sent {holder_requests} requests in {window:?} holding two keys (one keepalive per {KEEPALIVE_EVERY:?} renews both):\n{}",
        dump()
    );
    // It held both keys, under the same fences, for longer than a ttl: they were renewed.
    let (_, pump, valve) = holding(&lines, &holder, first.acquired).unwrap();
    let acts: Vec<(Duration, Vec<u64>)> = said(&lines, &holder, held_at)
        .filter(|(t, w)| *t < second.released && w.first() == Some(&"ACT"))
        .map(|(t, w)| (t, nums(&w)))
        .collect();
    assert!(acts.iter().all(|a| a.1[..2] == [pump, valve]), "{holder} acted under other fences:\n{}", dump());
    let last = acts.last().map_or(held_at, |a| a.0);
    assert!(
        last - held_at >= SESSION_TTL,
        "{holder} acted only {:?} after its grant:\n{}",
        last - held_at,
        dump()
    );
    assert!(
        !said(&lines, &holder, held_at)
            .any(|(t, w)| t < second.released && ["LOST", "SESSION"].contains(&w[0])),
        "{holder} lost a key while it renewed:\n{}",
        dump()
    );

    // Hand-offs by release are pushed.
    for h in [&first, &second] {
        let gap = h.acquired - h.released;
        println!(
            "pushed hand-off {} -> {}: {:.1} ms (bound {PUSHED_HAND_OFF:?})",
            h.from,
            h.to,
            gap.as_secs_f64() * 1e3
        );
        let queued =
            said(&lines, &h.to, Duration::ZERO).any(|(t, w)| t < h.released && w[..2] == ["QUEUED", "pump"]);
        assert!(queued, "{} was not queued for the pump when it was released:\n{}", h.to, dump());
        assert!(gap <= PUSHED_HAND_OFF, "hand-off {} -> {} took {gap:?}:\n{}", h.from, h.to, dump());
    }

    // A killed holder's keys go to the waiter once its session has expired: no sooner than a
    // ttl after the last keepalive it was answered (sent at reply - round trip; the host's
    // stamp is late by the log's delay, hence the slack), and no later than a ttl after the
    // kill and a generous delivery.
    let (renewed_at, rtt) = said(&lines, &victim, victim_held_at)
        .filter(|(t, w)| *t < killed_at && w.first() == Some(&"RENEWED"))
        .filter_map(|(t, w)| Some((t, Duration::from_micros(*nums(&w).first()?))))
        .last()
        .unwrap();
    let grant = said(&lines, &survivor, killed_at)
        .find(|(_, w)| w[..2] == ["ACQUIRED", "pump"])
        .map(|(t, _)| t)
        .unwrap();
    let since_keepalive = grant - (renewed_at - rtt);
    let since_kill = grant - killed_at;
    println!(
        "{victim} killed mid-hold: {survivor} granted the pump {:.3} s after the kill, {:.3} s after the last keepalive answered ({:.2} ttl)",
        since_kill.as_secs_f64(),
        since_keepalive.as_secs_f64(),
        since_keepalive.as_secs_f64() / SESSION_TTL.as_secs_f64()
    );
    let log_slack = Duration::from_millis(200);
    assert!(
        since_keepalive + log_slack >= SESSION_TTL,
        "the pump was granted {since_keepalive:?} after the dead holder's last keepalive, before its session expired:\n{}",
        dump()
    );
    let expiry = expiry_seen
        .get()
        .unwrap_or_else(|| panic!("the server never showed {victim_label}'s keys:\n{}", dump()));
    // `asked` was taken before the server read its clock, so `expiry` is at or before the
    // true one; the grant's host stamp is later than the grant. 20 ms for the timer's rounding.
    assert!(
        grant + Duration::from_millis(20) >= expiry,
        "the pump was granted {:?} ahead of the dead holder's expiry, before its session expired on the server:\n{}",
        expiry.saturating_sub(grant),
        dump()
    );
    assert!(
        since_kill <= SESSION_TTL + Duration::from_millis(1_500),
        "takeover took {since_kill:?}:\n{}",
        dump()
    );
    assert!(
        survivor_pump > victim_pump && survivor_valve > victim_valve,
        "new holder's fences ({survivor_pump}, {survivor_valve}) not above the dead holder's ({victim_pump}, {victim_valve}):\n{}",
        dump()
    );

    // The fenced log of both boards: per key, one party per fence, fences in order, and the
    // spans of consecutive fences never overlap in (host) time.
    for (key, i) in [("pump", 0), ("valve", 1)] {
        let mut spans: Vec<(u64, &str, Duration, Duration)> = Vec::new();
        for l in lines.iter().filter(|l| l.text.starts_with("ACT ")) {
            let fence = nums(&l.text.split_whitespace().collect::<Vec<_>>())[i];
            match spans.last_mut() {
                Some(s) if s.0 == fence => {
                    assert_eq!(s.1, l.who, "{key} fence {fence} used by two boards:\n{}", dump());
                    s.3 = l.t;
                }
                _ => {
                    if let Some(prev) = spans.last() {
                        assert!(fence > prev.0, "{key} fence {fence} acted after {}:\n{}", prev.0, dump());
                    }
                    spans.push((fence, &l.who, l.t, l.t));
                }
            }
        }
        assert!(spans.len() >= 4, "only {} holdings of {key}:\n{}", spans.len(), dump());
    }
    // The replayed stale pump command of a board's second grant is refused.
    let refusals: Vec<Vec<u64>> = lines
        .iter()
        .filter(|l| l.text.starts_with("REFUSED pump"))
        .map(|l| nums(&l.text.split_whitespace().collect::<Vec<_>>()))
        .collect();
    assert!(!refusals.is_empty(), "no board refused its replayed stale pump command:\n{}", dump());
    assert!(refusals.iter().all(|r| r.len() == 2 && r[0] < r[1]), "odd refusals {refusals:?}:\n{}", dump());

    for (i, (fw, image)) in firmwares.iter().zip(&images).enumerate() {
        let who = &format!("board{}", i + 1);
        // Every board took part: the embassy one too, whichever turn it had.
        assert!(holding(&lines, who, Duration::ZERO).is_some(), "{who} never held both keys:\n{}", dump());
        let e = elf(image);
        let stack = said(&lines, who, Duration::ZERO)
            .filter(|(_, w)| w.first() == Some(&"STACK"))
            .filter_map(|(_, w)| nums(&w).first().copied())
            .max()
            .unwrap_or_else(|| panic!("{who} reported no stack high-water mark:\n{}", dump()));
        let mut rtts: Vec<u64> = said(&lines, who, Duration::ZERO)
            .filter(|(_, w)| w.first() == Some(&"RENEWED"))
            .filter_map(|(_, w)| nums(&w).first().copied())
            .collect();
        rtts.sort_unstable();
        // Every board waited or held for longer than a keepalive interval, so each saw its
        // session renewed (the embassy build through its watch's wake-ups).
        assert!(!rtts.is_empty(), "{who} never logged a renewal:\n{}", dump());
        // A request's round trip that nothing holds: the valve's acquire, asked for the moment
        // the pump is granted, and free (only the pump's holder takes it, and it gives the
        // valve back first).
        let mut acquires: Vec<u64> = said(&lines, who, Duration::ZERO)
            .filter(|(_, w)| w[..2] == ["ACQUIRED", "valve"])
            .filter_map(|(_, w)| nums(&w).get(1).copied())
            .collect();
        acquires.sort_unstable();
        let ms = |v: &[u64], i: usize| v.get(i).map_or(0.0, |&r| r as f64 / 1e3);
        println!(
            "{who}: {}: flash {} B, static RAM {} B, stack high-water mark {stack} B; keepalive round trips (held ones included) min {:.2} ms, median {:.2} ms over {}; valve acquire round trip min {:.2} ms, median {:.2} ms over {}",
            fw.name(),
            e.flash(),
            e.static_ram(),
            ms(&rtts, 0),
            ms(&rtts, rtts.len() / 2),
            rtts.len(),
            ms(&acquires, 0),
            ms(&acquires, acquires.len() / 2),
            acquires.len()
        );
    }
}

#[test]
fn session_boards_are_pushed_their_grants_and_renew_two_keys_in_one_frame() {
    session_boards(|_| {}, "");
}

/// Each deliberate bug makes the session-board test fail, for the reason it should:
/// `cargo test -p leasehold --features fault-injection --test qemu planted`.
#[cfg(feature = "fault-injection")]
mod planted {
    use leasehold_core::session::authority::SessionFault;
    /// The message `f` panicked with; fails if it did not panic.
    fn failure(f: impl FnOnce()) -> String {
        let payload =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("the bug went unnoticed");
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    }

    #[test]
    fn planted_keepalives_never_held_is_caught_on_the_boards() {
        // The waiter's keepalives come back at once and it sends the next at once: it polls.
        let why = failure(|| super::session_boards(|_| {}, "no-hold"));
        assert!(why.starts_with("waiter sent"), "{why}");
    }

    #[test]
    fn planted_hand_off_before_the_holders_expiry_is_caught_on_the_boards() {
        // The server hands a dead holder's keys on a quarter of a ttl early.
        let early = |c: &mut leasehold_server::ServerConfig| c.session_fault = SessionFault::HandOffEarly;
        let why = failure(|| super::session_boards(early, ""));
        assert!(why.contains("before its session expired"), "{why}");
    }
}
