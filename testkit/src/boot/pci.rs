//! PCI configuration mechanism #1 (ports 0xcf8/0xcfc) with one function on it: the i440fx host
//! bridge at 00:00.0, whose PAM and SMRAM registers decide the map below 1 MiB.

use super::pam::{PAM_REG, SMRAM_REG};

/// The config address port.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The first config data port (0xcfc-0xcff).
pub const CONFIG_DATA: u16 = 0xcfc;

/// SMRAM bits (i440fx datasheet): D_OPEN, D_LCK; bits 2:0 are hard-wired to 010 (0xa0000).
const D_OPEN: u8 = 0x40;
const D_LCK: u8 = 0x10;
const C_BASE_SEG: u8 = 0x02;

/// What a config write changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Touched {
    /// A PAM register (0x59-0x5f) was written.
    pub pam: bool,
    /// SMRAM (0x72) was written.
    pub smram: bool,
}

/// The host bridge's config space and the config address latch.
#[derive(Clone, Debug)]
pub struct PciHost {
    address: u32,
    config: [u8; 256],
}

impl Default for PciHost {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHost {
    /// The bridge at reset: 8086:1237 rev 2, class 0x060000, subsystem 1af4:1100 (what makes
    /// SeaBIOS say "Running on QEMU (i440fx)" and use fw_cfg), PAM 0, SMRAM 0x02.
    pub fn new() -> Self {
        let mut config = [0u8; 256];
        let mut put16 = |at: usize, v: u16| config[at..at + 2].copy_from_slice(&v.to_le_bytes());
        put16(0x00, 0x8086);
        put16(0x02, 0x1237);
        put16(0x2c, 0x1af4);
        put16(0x2e, 0x1100);
        config[0x08] = 0x02;
        config[0x0b] = 0x06;
        config[SMRAM_REG as usize] = C_BASE_SEG;
        PciHost { address: 0, config }
    }

    /// The seven PAM registers, 0x59-0x5f.
    pub fn pam(&self) -> [u8; 7] {
        let at = PAM_REG as usize;
        self.config[at..at + 7].try_into().expect("seven bytes")
    }

    /// The SMRAM register.
    pub fn smram(&self) -> u8 {
        self.config[SMRAM_REG as usize]
    }

    /// Whether the latched address selects the host bridge, and at which register.
    fn selected(&self, port: u16) -> Option<usize> {
        let a = self.address;
        // Enable bit, bus 0, device 0, function 0.
        (a & 0x80ff_ff00 == 0x8000_0000)
            .then(|| (a & 0xfc) as usize + usize::from(port - CONFIG_DATA))
    }

    /// A port read of `data.len()` bytes at `port` (0xcf8-0xcff). Absent functions read all
    /// ones, as on real buses (SeaBIOS takes 0xffff as "no device").
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            CONFIG_ADDRESS if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            CONFIG_DATA..=0xcff => {
                if let Some(reg) = self.selected(port) {
                    for (i, b) in data.iter_mut().enumerate() {
                        *b = self.config.get(reg + i).copied().unwrap_or(0xff);
                    }
                }
            }
            // 0xcf9 (reset control) and narrower accesses to 0xcf8: nothing here.
            _ => {}
        }
    }

    /// A port write at `port`; says which registers that decide the memory map it touched.
    pub fn write(&mut self, port: u16, data: &[u8]) -> Touched {
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                let v = u32::from_le_bytes(data.try_into().expect("four bytes"));
                self.address = v & 0x80ff_fffc;
                Touched::default()
            }
            CONFIG_DATA..=0xcff => match self.selected(port) {
                Some(reg) => self.write_config(reg, data),
                None => Touched::default(),
            },
            _ => Touched::default(),
        }
    }

    fn write_config(&mut self, reg: usize, data: &[u8]) -> Touched {
        let mut touched = Touched::default();
        for (i, &v) in data.iter().enumerate() {
            let at = reg + i;
            match at {
                // Command register: the only header field software sets on a host bridge.
                0x04 | 0x05 => self.config[at] = v,
                // The rest of the header is read-only.
                0x00..=0x3f => {}
                _ if at == SMRAM_REG as usize => {
                    self.config[at] = smram_write(self.config[at], v);
                    touched.smram = true;
                }
                // Device-specific registers keep what is written, as QEMU's do; PAM decodes
                // only the mode bits.
                0x40..=0xff => {
                    self.config[at] = v;
                    touched.pam |= (PAM_REG as usize..PAM_REG as usize + 7).contains(&at);
                }
                _ => {}
            }
        }
        touched
    }
}

/// SMRAM after writing `new` over `old`: once D_LCK is set, D_OPEN stays clear and D_LCK stays
/// set until reset; bits 2:0 are hard-wired.
fn smram_write(old: u8, new: u8) -> u8 {
    let mut v = (new & !0x07) | C_BASE_SEG;
    if old & D_LCK != 0 {
        v = (v & !D_OPEN) | D_LCK;
    }
    if v & D_LCK != 0 {
        v &= !D_OPEN;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(pci: &mut PciHost, devfn: u32, reg: u32) {
        pci.write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | devfn << 8 | reg).to_le_bytes(),
        );
    }

    fn read32(pci: &PciHost, port: u16) -> u32 {
        let mut b = [0u8; 4];
        pci.read(port, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_identifies_itself_and_absent_functions_read_all_ones() {
        let mut pci = PciHost::new();
        select(&mut pci, 0, 0);
        assert_eq!(read32(&pci, CONFIG_DATA), 0x1237_8086);
        assert_eq!(read32(&pci, CONFIG_ADDRESS), 0x8000_0000);
        select(&mut pci, 0, 0x2c);
        assert_eq!(read32(&pci, CONFIG_DATA), 0x1100_1af4);
        select(&mut pci, 8, 0);
        assert_eq!(read32(&pci, CONFIG_DATA), 0xffff_ffff);
        // The enable bit clear: not a config cycle.
        pci.write(CONFIG_ADDRESS, &0u32.to_le_bytes());
        assert_eq!(read32(&pci, CONFIG_DATA), 0xffff_ffff);
    }

    #[test]
    fn seabios_dword_pam_writes_land_in_0x59_to_0x5f() {
        let mut pci = PciHost::new();
        select(&mut pci, 0, 0x58);
        let t = pci.write(CONFIG_DATA, &0x3333_3000u32.to_le_bytes());
        assert_eq!(
            t,
            Touched {
                pam: true,
                smram: false
            }
        );
        select(&mut pci, 0, 0x5c);
        pci.write(CONFIG_DATA, &0x3333_3333u32.to_le_bytes());
        assert_eq!(pci.pam(), [0x30, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33]);
        // A byte write through 0xcfd reaches register 0x5d.
        select(&mut pci, 0, 0x5c);
        pci.write(CONFIG_DATA + 1, &[0x11]);
        assert_eq!(pci.pam()[4], 0x11);
        // The header's identity cannot be overwritten.
        select(&mut pci, 0, 0);
        assert_eq!(pci.write(CONFIG_DATA, &[0, 0, 0, 0]), Touched::default());
        assert_eq!(read32(&pci, CONFIG_DATA), 0x1237_8086);
    }

    #[test]
    fn smram_lock_keeps_d_open_clear() {
        let mut pci = PciHost::new();
        select(&mut pci, 0, 0x70);
        pci.write(CONFIG_DATA + 2, &[0x4a]);
        assert_eq!(pci.smram(), 0x4a);
        pci.write(CONFIG_DATA + 2, &[0x1a]);
        assert_eq!(pci.smram(), 0x1a);
        let t = pci.write(CONFIG_DATA + 2, &[0x40]);
        assert!(t.smram && !t.pam);
        assert_eq!(pci.smram(), 0x12, "locked: D_OPEN refused, D_LCK kept");
    }
}
