//! A userspace wire between two TAP devices, for lab links with one-way
//! delay, random loss and a rate limit (this kernel has no `sch_netem`).
//!
//! A shaped link of the lab is two TAP devices instead of a veth pair, e.g.
//! a router's `wan` in its namespace and its port `pN` on the public bridge;
//! a [`Wire`] copies Ethernet frames between them, one thread per
//! direction. Each direction of the link applies the same [`Shaping`] on
//! its own: seeded random loss, then a rate limit (a FIFO link of
//! `rate_bps` with a tail-drop buffer of `queue`), then the one-way delay.
//! A frame's delivery time is never earlier than the one before it, so the
//! wire never reorders.
//!
//! Only IPv4 frames are shaped: ARP (and anything else) crosses at once and
//! is never lost, as on a real path, where neighbour discovery happens on
//! the first hop and not across the internet.
//!
//! # Speed
//!
//! The TAP devices carry a `virtio_net_hdr` (`IFF_VNET_HDR`) that the wire
//! passes through unchanged. While a link loses nothing and has no rate
//! limit, both devices take checksum, TSO and USO offloads
//! (`TUNSETOFFLOAD`), so a UDP GSO or TSO send crosses the wire as one
//! frame of up to 64 KiB instead of ~45: the wire costs two system calls per
//! 64 KiB then. With loss or a rate the offloads are off and the kernel
//! hands over MTU-sized frames, so that loss and rate apply to every packet
//! as on a real link. At zero delay a frame is written out as soon as it is
//! read, without a copy.
//!
//! # Lifetime
//!
//! The threads run in the process that made the lab (no helper process to
//! leak): [`Wire`]'s drop stops and joins them and closes both devices,
//! which removes them. The lab drops its wires before it deletes its
//! namespaces, also while a test panics; a killed test process takes its
//! threads and devices with it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a shaped link does to the IPv4 frames crossing it, in each direction
/// on its own (so a round trip over one link takes twice `delay`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shaping {
    /// One-way delay.
    pub delay: Duration,
    /// Fraction of frames dropped at random, 0.0 to 1.0.
    pub loss: f64,
    /// Rate limit in bits per second of Ethernet frames (header included);
    /// None: as fast as the wire's thread goes.
    pub rate_bps: Option<u64>,
    /// With a rate limit: how much the link's buffer holds, as time at that
    /// rate (frames that would wait longer are dropped). Default 50 ms, at
    /// least two full-size frames.
    pub queue: Duration,
    /// Seed of the loss decisions; None: one derived from the link's name,
    /// so that a lab of the same shape loses the same frames.
    pub seed: Option<u64>,
}

impl Default for Shaping {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue: Duration::from_millis(50),
            seed: None,
        }
    }
}

impl Shaping {
    /// Only a one-way delay.
    pub fn delay(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    /// Only random loss.
    pub fn loss(loss: f64) -> Self {
        Self {
            loss,
            ..Self::default()
        }
    }

    /// Whether frames cross untouched (no delay, loss or rate).
    fn is_clear(&self) -> bool {
        self.delay.is_zero() && self.loss <= 0.0 && self.rate_bps.is_none()
    }

    /// Whether the devices may take GSO frames and partial checksums.
    fn offloads(&self) -> bool {
        self.loss <= 0.0 && self.rate_bps.is_none()
    }

    fn check(&self) -> io::Result<()> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("loss {} is not within 0..=1", self.loss),
            ));
        }
        if self.rate_bps == Some(0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a rate of 0 bit/s carries nothing",
            ));
        }
        Ok(())
    }
}

/// Counters of one direction of a wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Frames read from the sending side (all kinds).
    pub frames: u64,
    /// IPv4 frames dropped by the random loss.
    pub lost: u64,
    /// IPv4 frames dropped because the rate limit's buffer (or the delay
    /// line's memory bound) was full.
    pub overflow: u64,
    /// Frames written to the other side.
    pub delivered: u64,
    /// Writes the other side refused.
    pub write_errors: u64,
}

/// Counters of a wire: `out` from the inner device (a router's `wan`, a
/// host's `eth0`) towards the network it is plugged into, `into` the other
/// way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStats {
    pub out: DirectionStats,
    pub into: DirectionStats,
}

#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    lost: AtomicU64,
    overflow: AtomicU64,
    delivered: AtomicU64,
    write_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            frames: self.frames.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            overflow: self.overflow.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }
}

struct Shared {
    shaping: Mutex<Shaping>,
    /// Bumped on every change of `shaping`; the threads reload on a change.
    generation: AtomicU64,
    counters: [Counters; 2],
}

impl Shared {
    fn shaping(&self) -> Shaping {
        *self.shaping.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Two TAP devices joined by two threads; see the module documentation.
pub struct Wire {
    name: String,
    inner: Arc<OwnedFd>,
    outer: Arc<OwnedFd>,
    /// An eventfd that ends both threads once written.
    stop: Arc<OwnedFd>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("name", &self.name)
            .field("shaping", &self.shared.shaping())
            .finish()
    }
}

// linux/if_tun.h
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// `struct virtio_net_hdr`: in front of every frame read or written.
const VNET_HDR: usize = 10;
/// Room for the largest GSO frame (64 KiB of IP plus the headers).
const FRAME_BUF: usize = VNET_HDR + 14 + 65_536 + 256;
/// Frames read per wake-up before the due ones are written.
const READ_BATCH: usize = 256;
/// Most bytes one direction holds in its delay line (beyond that frames are
/// dropped as overflow): 64 MiB, 50 ms of 10 Gbit/s.
const MAX_HELD: usize = 64 << 20;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the TAP device `name` (with a `virtio_net_hdr` on every frame)
/// in the network namespace of the calling thread; the device lives as long
/// as the returned descriptor. Non-blocking.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?}"),
        ));
    }
    // SAFETY: open(2) of a constant NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes on
    // Linux, which `IfReq` is).
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let size: libc::c_int = VNET_HDR as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            TUNSETVNETHDRSZ as _,
            &size as *const libc::c_int,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Tells the kernel which offloads the reader of `fd` handles.
fn set_offloads(fd: RawFd, on: bool) -> io::Result<()> {
    let full = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6;
    let tcp_only = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    let tries: &[libc::c_uint] = if on { &[full, tcp_only, 0] } else { &[0] };
    let mut last = io::Error::other("no offload setting was accepted");
    for flags in tries {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, *flags as libc::c_ulong) } == 0 {
            return Ok(());
        }
        last = io::Error::last_os_error();
    }
    Err(last)
}

/// A 64-bit seed from a name (FNV-1a).
pub fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// SplitMix64: small, fast, good enough for loss decisions.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Wire {
    /// Joins `inner` and `outer` (TAP devices from [`open_tap`]) with
    /// `shaping`; `name` labels the threads and seeds the loss.
    pub fn start(name: &str, inner: OwnedFd, outer: OwnedFd, shaping: Shaping) -> io::Result<Wire> {
        shaping.check()?;
        for fd in [&inner, &outer] {
            set_offloads(fd.as_raw_fd(), shaping.offloads())?;
        }
        // SAFETY: eventfd(2) with valid flags.
        let stop = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if stop < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor owned by nobody else.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(stop) });
        let shared = Arc::new(Shared {
            shaping: Mutex::new(shaping),
            generation: AtomicU64::new(0),
            counters: [Counters::default(), Counters::default()],
        });
        let (inner, outer) = (Arc::new(inner), Arc::new(outer));
        let mut wire = Wire {
            name: name.to_string(),
            inner: inner.clone(),
            outer: outer.clone(),
            stop: stop.clone(),
            shared: shared.clone(),
            threads: Vec::new(),
        };
        let base_seed = shaping.seed.unwrap_or_else(|| seed_of(name));
        for (dir, (from, to)) in [(inner.clone(), outer.clone()), (outer, inner)]
            .into_iter()
            .enumerate()
        {
            let (stop, shared) = (stop.clone(), shared.clone());
            let label = format!("wire-{}-{}", name, ["out", "in"][dir]);
            let thread = std::thread::Builder::new()
                .name(label.chars().take(15).collect())
                .spawn(move || {
                    Direction {
                        dir,
                        from,
                        to,
                        stop,
                        shared,
                        base_seed,
                    }
                    .run()
                })?;
            // Pushed at once: a failure to start the second thread still
            // stops the first (in drop).
            wire.threads.push(thread);
        }
        Ok(wire)
    }

    /// The wire's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current shaping.
    pub fn shaping(&self) -> Shaping {
        self.shared.shaping()
    }

    /// Changes the shaping of both directions from now on (frames already
    /// held keep their delivery time; a new seed restarts the loss sequence).
    pub fn set_shaping(&self, shaping: Shaping) -> io::Result<()> {
        shaping.check()?;
        for fd in [&self.inner, &self.outer] {
            set_offloads(fd.as_raw_fd(), shaping.offloads())?;
        }
        *self
            .shared
            .shaping
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = shaping;
        self.shared.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The counters so far.
    pub fn stats(&self) -> WireStats {
        WireStats {
            out: self.shared.counters[0].snapshot(),
            into: self.shared.counters[1].snapshot(),
        }
    }

    /// Whether both threads still run.
    pub fn running(&self) -> bool {
        self.threads.len() == 2 && self.threads.iter().all(|t| !t.is_finished())
    }

    fn stop(&mut self) {
        let one: u64 = 1;
        // SAFETY: write(2) of 8 bytes to an eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One direction of a wire: reads `from`, writes `to`.
struct Direction {
    dir: usize,
    from: Arc<OwnedFd>,
    to: Arc<OwnedFd>,
    stop: Arc<OwnedFd>,
    shared: Arc<Shared>,
    base_seed: u64,
}

/// A frame in the delay line (the vnet header included) and when it is due.
struct Held {
    due: Instant,
    frame: Vec<u8>,
}

impl Direction {
    fn run(self) {
        let from = self.from.as_raw_fd();
        let to = self.to.as_raw_fd();
        let counters = &self.shared.counters[self.dir];
        let mut generation = self.shared.generation.load(Ordering::Acquire);
        let mut shaping = self.shared.shaping();
        let seed_for = |s: &Shaping| {
            s.seed.unwrap_or(self.base_seed) ^ (self.dir as u64).wrapping_mul(0x9e37_79b9)
        };
        let mut rng = Rng(seed_for(&shaping));
        let mut buf = vec![0u8; FRAME_BUF];
        let mut line: VecDeque<Held> = VecDeque::new();
        let mut held_bytes = 0usize;
        let mut spare: Vec<Vec<u8>> = Vec::new();
        // When the rate-limited link has sent everything it took so far.
        let mut link_free = Instant::now();
        loop {
            // Everything that is due goes out first.
            let now = Instant::now();
            while line.front().is_some_and(|h| h.due <= now) {
                let Some(h) = line.pop_front() else { break };
                held_bytes -= h.frame.len();
                write_frame(to, &h.frame, counters);
                if spare.len() < 1024 {
                    spare.push(h.frame);
                }
            }
            let timeout = line.front().map(|h| h.due.saturating_duration_since(now));
            match wait(from, self.stop.as_raw_fd(), timeout) {
                Wake::Stop => return,
                Wake::Timeout => continue,
                Wake::Readable => {}
            }
            let g = self.shared.generation.load(Ordering::Acquire);
            if g != generation {
                generation = g;
                let next = self.shared.shaping();
                if next.seed != shaping.seed {
                    rng = Rng(seed_for(&next));
                }
                shaping = next;
            }
            for _ in 0..READ_BATCH {
                // SAFETY: read(2) into a buffer of `buf.len()` bytes.
                let n = unsafe { libc::read(from, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    match io::Error::last_os_error().raw_os_error() {
                        Some(libc::EAGAIN) => break,
                        Some(libc::EINTR) => continue,
                        // The device is down (or going away): wait a little.
                        Some(libc::EIO) => {
                            std::thread::sleep(Duration::from_millis(5));
                            break;
                        }
                        _ => return,
                    }
                }
                let n = n as usize;
                if n < VNET_HDR + 14 {
                    continue;
                }
                counters.frames.fetch_add(1, Ordering::Relaxed);
                let frame = &buf[..n];
                let ipv4 = frame[VNET_HDR + 12..VNET_HDR + 14] == ETH_P_IP;
                if !ipv4 || shaping.is_clear() {
                    // Nothing to do to it; it must not overtake held frames
                    // of its own kind though.
                    if ipv4 && !line.is_empty() {
                        let due = line_tail(&line);
                        hold(&mut line, &mut held_bytes, &mut spare, due, frame);
                    } else {
                        write_frame(to, frame, counters);
                    }
                    continue;
                }
                if shaping.loss > 0.0 && rng.unit() < shaping.loss {
                    counters.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let now = Instant::now();
                let mut sent = now;
                if let Some(rate) = shaping.rate_bps {
                    let start = link_free.max(now);
                    let max_wait = shaping
                        .queue
                        .max(Duration::from_secs_f64(2.0 * 1514.0 * 8.0 / rate as f64));
                    if start.duration_since(now) > max_wait {
                        counters.overflow.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let wire_bytes = (n - VNET_HDR) as f64;
                    link_free = start + Duration::from_secs_f64(wire_bytes * 8.0 / rate as f64);
                    sent = link_free;
                }
                // Never before the frame ahead of it.
                let due = (sent + shaping.delay).max(line_tail(&line));
                if due <= now && line.is_empty() {
                    write_frame(to, frame, counters);
                } else if held_bytes + n > MAX_HELD {
                    counters.overflow.fetch_add(1, Ordering::Relaxed);
                } else {
                    hold(&mut line, &mut held_bytes, &mut spare, due, frame);
                }
            }
        }
    }
}

/// The delivery time of the last held frame (or long ago).
fn line_tail(line: &VecDeque<Held>) -> Instant {
    line.back()
        .map(|h| h.due)
        .unwrap_or_else(|| Instant::now() - Duration::from_secs(1))
}

fn hold(
    line: &mut VecDeque<Held>,
    held_bytes: &mut usize,
    spare: &mut Vec<Vec<u8>>,
    due: Instant,
    frame: &[u8],
) {
    let mut v = spare.pop().unwrap_or_default();
    v.clear();
    v.extend_from_slice(frame);
    *held_bytes += v.len();
    line.push_back(Held { due, frame: v });
}

fn write_frame(fd: RawFd, frame: &[u8], counters: &Counters) {
    loop {
        // SAFETY: write(2) of `frame`.
        let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
        if n >= 0 {
            counters.delivered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        counters.write_errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
}

enum Wake {
    Readable,
    Timeout,
    Stop,
}

/// Waits until `fd` is readable, `stop` is signalled, or `timeout` passed
/// (None: no timeout), with microsecond precision.
fn wait(fd: RawFd, stop: RawFd, timeout: Option<Duration>) -> Wake {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: ppoll(2) on two pollfds we own, a valid or null timeout and
    // no signal mask.
    let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, tsp, std::ptr::null()) };
    if r < 0 {
        // EINTR: look again.
        return Wake::Timeout;
    }
    if fds[1].revents != 0 {
        return Wake::Stop;
    }
    if fds[0].revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
        Wake::Readable
    } else {
        Wake::Timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_sequence_is_uniform_and_repeatable() {
        let mut a = Rng(seed_of("p1"));
        let mut b = Rng(seed_of("p1"));
        let n = 100_000;
        let lost = (0..n).filter(|_| a.unit() < 0.01).count();
        let again = (0..n).filter(|_| b.unit() < 0.01).count();
        assert_eq!(lost, again);
        // 1000 expected, standard deviation ~31.
        assert!((850..1150).contains(&lost), "{lost}");
        assert_ne!(seed_of("p1"), seed_of("p2"));
    }

    #[test]
    fn shaping_is_checked() {
        assert!(Shaping::loss(1.5).check().is_err());
        assert!(Shaping {
            rate_bps: Some(0),
            ..Shaping::default()
        }
        .check()
        .is_err());
        assert!(Shaping::delay(Duration::from_millis(5)).check().is_ok());
        assert!(Shaping::default().is_clear());
        assert!(Shaping::delay(Duration::ZERO).offloads());
        assert!(!Shaping::loss(0.01).offloads());
    }
}
