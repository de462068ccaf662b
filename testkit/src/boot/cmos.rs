//! The MC146818 CMOS/RTC at ports 0x70 (index) and 0x71 (data), holding what SeaBIOS reads from
//! it on QEMU: RAM size, CPU count, no floppy, and a clock that never reports an update in
//! progress. KVM does not emulate it. No RTC interrupt (IRQ 8): SeaBIOS's POST does not wait on it.

use std::time::{SystemTime, UNIX_EPOCH};

/// The index port (bit 7 masks NMI, ignored here).
pub const INDEX: u16 = 0x70;
/// The data port.
pub const DATA: u16 = 0x71;

/// The CMOS: 128 bytes and the selected index.
#[derive(Clone, Debug)]
pub struct Cmos {
    index: u8,
    regs: [u8; 128],
}

impl Cmos {
    /// The CMOS of a machine with `ram` bytes of RAM below 4 GiB and `cpus` CPUs.
    pub fn new(ram: u64, cpus: usize) -> Self {
        let mut regs = [0u8; 128];
        regs[0x0a] = 0x26; // 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) never set.
        regs[0x0b] = 0x02; // 24-hour, BCD.
        regs[0x0d] = 0x80; // Valid RAM and time.
                           // 0x0f shutdown status 0 (normal POST); 0x10 no floppy drive.
                           // Base memory: 640 KiB.
        regs[0x15..0x17].copy_from_slice(&640u16.to_le_bytes());
        // KiB above 1 MiB, capped at 0xffff (0x17/0x18 and again at 0x30/0x31).
        let ext = (ram.saturating_sub(1 << 20) >> 10).min(0xffff) as u16;
        regs[0x17..0x19].copy_from_slice(&ext.to_le_bytes());
        regs[0x30..0x32].copy_from_slice(&ext.to_le_bytes());
        // 64 KiB units above 16 MiB, what SeaBIOS sizes RAM by without fw_cfg's e820.
        let above16 = (ram.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        regs[0x34..0x36].copy_from_slice(&above16.to_le_bytes());
        // CPUs - 1 (SeaBIOS's CMOS_BIOS_SMP_COUNT).
        regs[0x5f] = cpus.saturating_sub(1).min(255) as u8;
        Cmos { index: 0, regs }
    }

    /// A read of `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            DATA => self.read_reg(self.index),
            // The index register is write-only; QEMU reads 0xff.
            _ => 0xff,
        }
    }

    /// A write of `value` to `port`.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            INDEX => self.index = value & 0x7f,
            DATA => match self.index {
                // Status C and D are read-only; A's update-in-progress bit too.
                0x0c | 0x0d => {}
                0x0a => self.regs[0x0a] = value & 0x7f,
                i => self.regs[usize::from(i)] = value,
            },
            _ => {}
        }
    }

    fn read_reg(&mut self, index: u8) -> u8 {
        let clock = Clock::now();
        match index {
            0x00 => bcd(clock.second),
            0x02 => bcd(clock.minute),
            0x04 => bcd(clock.hour),
            0x06 => bcd(clock.weekday),
            0x07 => bcd(clock.day),
            0x08 => bcd(clock.month),
            0x09 => bcd(clock.year % 100),
            0x32 => bcd(clock.year / 100),
            // Reading status C clears the (never raised) interrupt flags.
            0x0c => 0,
            i => self.regs[usize::from(i & 0x7f)],
        }
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10 % 10) << 4) | (v % 10)) as u8
}

/// The host's UTC time of day and date.
struct Clock {
    second: u32,
    minute: u32,
    hour: u32,
    weekday: u32,
    day: u32,
    month: u32,
    year: u32,
}

impl Clock {
    fn now() -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self::at(secs)
    }

    fn at(secs: u64) -> Self {
        let days = secs / 86_400;
        let t = (secs % 86_400) as u32;
        // Days since 1970-01-01 to a civil date (proleptic Gregorian; eras of 400 years).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Clock {
            second: t % 60,
            minute: t / 60 % 60,
            hour: t / 3600,
            // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
            weekday: ((days + 4) % 7 + 1) as u32,
            day: day as u32,
            month: month as u32,
            year: year as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(c: &mut Cmos, i: u8) -> u8 {
        c.write(INDEX, i | 0x80);
        c.read(DATA)
    }

    #[test]
    fn seabios_finds_ram_and_cpus() {
        let mut c = Cmos::new(512 << 20, 8);
        // (512 - 16) MiB in 64 KiB units.
        assert_eq!(
            u16::from_le_bytes([reg(&mut c, 0x34), reg(&mut c, 0x35)]),
            0x1f00
        );
        assert_eq!(
            u16::from_le_bytes([reg(&mut c, 0x30), reg(&mut c, 0x31)]),
            0xffff
        );
        assert_eq!(reg(&mut c, 0x5f), 7);
        assert_eq!(reg(&mut c, 0x10), 0, "no floppy");
        assert_eq!(reg(&mut c, 0x0a) & 0x80, 0, "no update in progress");
        assert_ne!(reg(&mut c, 0x08), 0xff, "a month: SeaBIOS's rtc_present()");
        c.write(DATA, 0xab);
        assert_eq!(
            reg(&mut c, 0x08),
            bcd(Clock::now().month),
            "the clock is the host's"
        );
        c.write(INDEX, 0x0f);
        c.write(DATA, 0x05);
        assert_eq!(reg(&mut c, 0x0f), 5);
        assert_eq!(Cmos::new(8 << 20, 1).regs[0x34], 0);
    }

    #[test]
    fn dates_convert() {
        let c = Clock::at(951_782_400); // 2000-02-29 00:00:00 UTC, a Tuesday.
        assert_eq!((c.year, c.month, c.day, c.weekday), (2000, 2, 29, 3));
        let c = Clock::at(1_767_225_599); // 2025-12-31 23:59:59.
        assert_eq!((c.year, c.month, c.day), (2025, 12, 31));
        assert_eq!((c.hour, c.minute, c.second), (23, 59, 59));
        assert_eq!(bcd(59), 0x59);
    }
}
