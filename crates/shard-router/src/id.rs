//! 64-bit (and 53-bit) ids that carry their logical slot, so a row is routed from its id alone.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{BuildError, IdError};

/// How an id's bits are laid out, high to low: time units since the epoch, a sequence within
/// the unit, the generator's node number, the slot. The slot sits in the low bits
/// (`id % 2^slot_bits`), and time then sequence above everything else keep one generator's ids
/// strictly increasing in the order it issued them.
///
/// ```
/// use stanchion_shard_router::IdLayout;
/// let epoch = 1_767_225_600_000; // 2026-01-01 in Unix milliseconds
/// let bigint = IdLayout::bigint(epoch);
/// assert_eq!(bigint.total_bits(), 63); // always a positive `bigint`
/// assert!(bigint.lifetime().as_secs() > 60 * 365 * 86_400);
/// let js = IdLayout::js_safe(epoch);
/// assert_eq!(js.total_bits(), 53); // exact in a JavaScript number
/// // Fewer node bits, more sequence bits:
/// let custom = IdLayout::bigint(epoch).with_bits(12, 2, 8)?;
/// assert_eq!(custom.total_bits(), 63);
/// # Ok::<(), stanchion_shard_router::BuildError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct IdLayout {
    epoch_ms: u64,
    unit_ms: u64,
    total: u8,
    time_bits: u8,
    seq_bits: u8,
    node_bits: u8,
    slot_bits: u8,
}

/// The parts of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdParts {
    /// When it was issued, in Unix milliseconds (to the layout's time unit).
    pub unix_ms: u64,
    /// Its sequence number within the time unit.
    pub sequence: u64,
    /// The generator's node number.
    pub node: u64,
    /// The logical slot.
    pub slot: u32,
}

impl IdLayout {
    /// 63 bits (a positive `bigint`): 41 bits of milliseconds (69 years after `epoch_ms`), 6 of
    /// sequence (64 ids per millisecond per generator), 4 of node (16 generators), 12 of slot
    /// (4,096 slots).
    pub fn bigint(epoch_ms: u64) -> Self {
        IdLayout {
            epoch_ms,
            unit_ms: 1,
            total: 63,
            time_bits: 41,
            seq_bits: 6,
            node_bits: 4,
            slot_bits: 12,
        }
    }

    /// 53 bits (exact as a JavaScript number): 32 bits of seconds (136 years), 8 of sequence
    /// (256 ids per second per generator), 3 of node (8 generators), 10 of slot (1,024 slots).
    /// Fifty-three bits leave little room: for more ids per second use fewer node or slot bits.
    pub fn js_safe(epoch_ms: u64) -> Self {
        IdLayout {
            epoch_ms,
            unit_ms: 1000,
            total: 53,
            time_bits: 32,
            seq_bits: 8,
            node_bits: 3,
            slot_bits: 10,
        }
    }

    /// The same total and time unit with other slot, node and sequence widths; the time field
    /// gets the rest (at least 20 bits).
    pub fn with_bits(self, slot_bits: u8, node_bits: u8, seq_bits: u8) -> Result<Self, BuildError> {
        let used = u16::from(slot_bits) + u16::from(node_bits) + u16::from(seq_bits);
        if slot_bits > 16 {
            return Err(BuildError::IdLayout(format!(
                "`slot_bits` is {slot_bits}; slots fit in 16 bits"
            )));
        }
        if used + 20 > u16::from(self.total) {
            return Err(BuildError::IdLayout(format!(
                "slot, node and sequence take {used} of {} bits, leaving under 20 for time",
                self.total
            )));
        }
        Ok(IdLayout {
            slot_bits,
            node_bits,
            seq_bits,
            time_bits: self.total - used as u8,
            ..self
        })
    }

    /// The same bits with another time unit in milliseconds (at least 1).
    pub fn with_unit_ms(self, unit_ms: u64) -> Result<Self, BuildError> {
        if unit_ms == 0 {
            return Err(BuildError::Zero { field: "unit_ms" });
        }
        Ok(IdLayout { unit_ms, ..self })
    }

    /// Bits an id uses (63 or 53 for the presets).
    pub fn total_bits(&self) -> u8 {
        self.total
    }

    /// Slots the layout can carry (`2^slot_bits`).
    pub fn slots(&self) -> u32 {
        1 << self.slot_bits
    }

    /// How long after the epoch ids can be made.
    pub fn lifetime(&self) -> Duration {
        Duration::from_millis(
            (1_u64 << self.time_bits)
                .saturating_mul(self.unit_ms)
                .saturating_sub(1),
        )
    }

    /// The slot an id carries: no lookup, no hash.
    #[inline]
    pub fn slot(&self, id: i64) -> u32 {
        (id as u64 & ((1 << self.slot_bits) - 1)) as u32
    }

    /// All the parts of an id.
    pub fn decode(&self, id: i64) -> IdParts {
        let v = id as u64;
        let slot = (v & ((1 << self.slot_bits) - 1)) as u32;
        let v = v >> self.slot_bits;
        let node = v & ((1 << self.node_bits) - 1);
        let v = v >> self.node_bits;
        let sequence = v & ((1 << self.seq_bits) - 1);
        let units = v >> self.seq_bits;
        IdParts {
            unix_ms: self.epoch_ms + units * self.unit_ms,
            sequence,
            node,
            slot,
        }
    }

    fn compose(&self, units: u64, seq: u64, node: u64, slot: u64) -> i64 {
        let v =
            (((units << self.seq_bits | seq) << self.node_bits | node) << self.slot_bits) | slot;
        v as i64
    }
}

/// Where ids read the time: the system clock, or a clock a test moves by hand.
pub trait IdClock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn unix_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemIdClock;

impl IdClock for SystemIdClock {
    fn unix_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock set by hand (for tests of clock jumps).
#[derive(Debug, Default)]
pub struct ManualIdClock(AtomicU64);

impl ManualIdClock {
    /// Reads `unix_ms` until set again.
    pub fn new(unix_ms: u64) -> Self {
        ManualIdClock(AtomicU64::new(unix_ms))
    }
    /// Sets the time (it may go backwards).
    pub fn set(&self, unix_ms: u64) {
        self.0.store(unix_ms, Ordering::Relaxed);
    }
}

impl IdClock for ManualIdClock {
    fn unix_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Issues ids for one node (one process, or one worker in it): unique as long as no two live
/// generators share a node number, strictly increasing in the order issued.
///
/// When the clock goes back by at most `tolerance` (default 1 s: NTP steps are usually
/// smaller), ids keep coming from the last time unit used, so they still increase; when the
/// sequence of that unit runs out, or the clock went back further, [`IdGenerator::try_next`]
/// errors with the time to wait and [`IdGenerator::next`] waits for it (up to `max_wait`,
/// default 2 s). An id is never issued below one already issued.
///
/// ```
/// use stanchion_shard_router::{IdGenerator, IdLayout};
/// let layout = IdLayout::bigint(1_767_225_600_000);
/// let ids = IdGenerator::new(layout, 3)?;
/// let a = ids.try_next(1234)?;
/// let b = ids.try_next(7)?;
/// assert!(b > a);
/// assert_eq!(layout.slot(a), 1234);
/// assert_eq!(layout.decode(b).node, 3);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct IdGenerator<C = SystemIdClock> {
    layout: IdLayout,
    node: u64,
    clock: C,
    tolerance: Duration,
    max_wait: Duration,
    state: Mutex<Option<(u64, u64)>>,
}

impl IdGenerator<SystemIdClock> {
    /// A generator for node `node` on the system clock.
    pub fn new(layout: IdLayout, node: u32) -> Result<Self, BuildError> {
        Self::with_clock(layout, node, SystemIdClock)
    }
}

impl<C: IdClock> IdGenerator<C> {
    /// A generator reading `clock`.
    pub fn with_clock(layout: IdLayout, node: u32, clock: C) -> Result<Self, BuildError> {
        if u64::from(node) >= 1 << layout.node_bits {
            return Err(BuildError::IdLayout(format!(
                "`node` {node} does not fit in {} node bits",
                layout.node_bits
            )));
        }
        Ok(IdGenerator {
            layout,
            node: u64::from(node),
            clock,
            tolerance: Duration::from_secs(1),
            max_wait: Duration::from_secs(2),
            state: Mutex::new(None),
        })
    }

    /// How far back the clock may go before ids stop (default 1 s; at most one hour).
    pub fn tolerance(mut self, tolerance: Duration) -> Result<Self, BuildError> {
        if tolerance > Duration::from_secs(3600) {
            return Err(BuildError::TooLarge {
                field: "tolerance (ms)",
                value: u64::try_from(tolerance.as_millis()).unwrap_or(u64::MAX),
                max: 3_600_000,
            });
        }
        self.tolerance = tolerance;
        Ok(self)
    }

    /// How long [`IdGenerator::next`] waits for the clock before it errors (default 2 s; at
    /// most one hour).
    pub fn max_wait(mut self, max_wait: Duration) -> Result<Self, BuildError> {
        if max_wait > Duration::from_secs(3600) {
            return Err(BuildError::TooLarge {
                field: "max_wait (ms)",
                value: u64::try_from(max_wait.as_millis()).unwrap_or(u64::MAX),
                max: 3_600_000,
            });
        }
        self.max_wait = max_wait;
        Ok(self)
    }

    /// The layout ids are made with.
    pub fn layout(&self) -> &IdLayout {
        &self.layout
    }

    /// The next id for `slot`, or an error saying how long to wait.
    pub fn try_next(&self, slot: u32) -> Result<i64, IdError> {
        let l = &self.layout;
        if slot >= l.slots() {
            return Err(IdError::SlotTooLarge {
                slot,
                bits: l.slot_bits,
            });
        }
        let now = self.clock.unix_ms();
        let since = now.checked_sub(l.epoch_ms).ok_or(IdError::BeforeEpoch)?;
        let mut units = since / l.unit_ms;
        let unit_left = Duration::from_millis(l.unit_ms - since % l.unit_ms);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let prev = *state;
        let mut behind = Duration::ZERO;
        if let Some((last, _)) = prev
            && units < last
        {
            behind = Duration::from_millis((last - units).saturating_mul(l.unit_ms));
            if behind > self.tolerance {
                return Err(IdError::ClockWentBack {
                    behind,
                    tolerance: self.tolerance,
                    retry_after: behind,
                });
            }
            units = last;
        }
        let next_seq = match prev {
            Some((last, seq)) if last == units => seq + 1,
            _ => 0,
        };
        if next_seq >= 1 << l.seq_bits {
            return Err(IdError::Exhausted {
                retry_after: behind + unit_left,
            });
        }
        if units >= 1 << l.time_bits {
            return Err(IdError::OutOfTime {
                lifetime: l.lifetime(),
            });
        }
        *state = Some((units, next_seq));
        Ok(l.compose(units, next_seq, self.node, u64::from(slot)))
    }

    /// The next id for `slot`, waiting (asynchronously) while the sequence is exhausted or the
    /// clock is behind, up to `max_wait`; then the error.
    pub async fn next(&self, slot: u32) -> Result<i64, IdError> {
        let start = tokio::time::Instant::now();
        loop {
            match self.try_next(slot) {
                Err(
                    IdError::Exhausted { retry_after } | IdError::ClockWentBack { retry_after, .. },
                ) if start.elapsed() + retry_after <= self.max_wait => {
                    tokio::time::sleep(retry_after).await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u64 = 1_767_225_600_000;

    #[test]
    fn exhausting_a_unit_asks_to_wait_and_the_next_unit_goes_on() {
        let clock = ManualIdClock::new(EPOCH + 5);
        let ids = IdGenerator::with_clock(IdLayout::bigint(EPOCH), 0, clock).unwrap();
        let mut last = 0;
        for _ in 0..64 {
            let id = ids.try_next(1).unwrap();
            assert!(id > last);
            last = id;
        }
        assert!(matches!(ids.try_next(1), Err(IdError::Exhausted { .. })));
        ids.clock.set(EPOCH + 6);
        assert!(ids.try_next(1).unwrap() > last);
    }

    #[test]
    fn a_clock_that_goes_back_never_makes_a_smaller_id() {
        let clock = ManualIdClock::new(EPOCH + 10_000);
        let ids = IdGenerator::with_clock(IdLayout::bigint(EPOCH), 1, clock).unwrap();
        let a = ids.try_next(0).unwrap();
        ids.clock.set(EPOCH + 9_500); // back 500 ms: within tolerance
        let b = ids.try_next(0).unwrap();
        assert!(b > a);
        ids.clock.set(EPOCH + 5_000); // back 5 s: refused
        let e = ids.try_next(0).unwrap_err();
        assert!(matches!(e, IdError::ClockWentBack { .. }), "{e}");
        ids.clock.set(EPOCH + 10_001);
        assert!(ids.try_next(0).unwrap() > b);
    }

    #[test]
    fn layouts_and_nodes_are_checked() {
        assert!(IdGenerator::new(IdLayout::bigint(EPOCH), 16).is_err());
        assert!(IdLayout::bigint(EPOCH).with_bits(17, 0, 0).is_err());
        assert!(IdLayout::js_safe(EPOCH).with_bits(16, 8, 10).is_err());
        assert!(IdLayout::bigint(EPOCH).with_unit_ms(0).is_err());
        let ids =
            IdGenerator::with_clock(IdLayout::bigint(EPOCH), 0, ManualIdClock::new(1)).unwrap();
        assert_eq!(ids.try_next(0), Err(IdError::BeforeEpoch));
        assert!(matches!(
            ids.try_next(4096),
            Err(IdError::SlotTooLarge { .. })
        ));
    }
}
