//! QEMU's firmware configuration device (fw_cfg), legacy port interface only (selector 0x510,
//! data 0x511, no DMA), with the few items SeaBIOS reads. Without it SeaBIOS would wait 2.5 s in
//! a boot menu every boot; with it, key 0x0e (boot menu) reads 0 and the menu is skipped.
//! Unknown keys read zeros, as QEMU's do, which SeaBIOS takes as "empty": no files, no e820
//! table (RAM comes from CMOS), no ACPI or SMBIOS entries.

/// The selector port (16-bit writes).
pub const SELECTOR: u16 = 0x510;
/// The data port (byte reads; SeaBIOS uses `insb`).
pub const DATA: u16 = 0x511;

const SIGNATURE: u16 = 0x00;
const ID: u16 = 0x01;
const NB_CPUS: u16 = 0x05;
const MAX_CPUS: u16 = 0x0f;

/// The device: its items and the read position in the selected one.
#[derive(Clone, Debug)]
pub struct FwCfg {
    cpus: u16,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// fw_cfg for a machine with `cpus` CPUs (all present).
    pub fn new(cpus: usize) -> Self {
        FwCfg {
            cpus: u16::try_from(cpus).unwrap_or(u16::MAX),
            selected: 0,
            offset: 0,
        }
    }

    fn item(&self, key: u16) -> Vec<u8> {
        match key {
            SIGNATURE => b"QEMU".to_vec(),
            // Version 1: the traditional interface, no DMA.
            ID => 1u32.to_le_bytes().to_vec(),
            NB_CPUS | MAX_CPUS => self.cpus.to_le_bytes().to_vec(),
            _ => Vec::new(),
        }
    }

    /// A write to `port`: a selector write picks an item and rewinds it.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        if port == SELECTOR {
            let mut key = [0u8; 2];
            for (k, b) in key.iter_mut().zip(data) {
                *k = *b;
            }
            self.selected = u16::from_le_bytes(key);
            self.offset = 0;
        }
        // Data writes need DMA in this interface's version: ignored, as QEMU does.
    }

    /// A read of `data.len()` bytes from `port` (many at once for `insb`): the selected item's
    /// next bytes, zeros past its end.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0);
        if port != DATA {
            return;
        }
        let item = self.item(self.selected);
        for b in data.iter_mut() {
            *b = item.get(self.offset).copied().unwrap_or(0);
            self.offset = self.offset.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_cpus_and_empty_items() {
        let mut f = FwCfg::new(8);
        f.write(SELECTOR, &SIGNATURE.to_le_bytes());
        let mut sig = [0u8; 4];
        for b in &mut sig {
            let mut one = [0u8];
            f.read(DATA, &mut one);
            *b = one[0];
        }
        assert_eq!(&sig, b"QEMU");
        f.write(SELECTOR, &NB_CPUS.to_le_bytes());
        let mut n = [0u8; 2];
        f.read(DATA, &mut n); // as one `insb` of 2
        assert_eq!(u16::from_le_bytes(n), 8);
        f.write(SELECTOR, &0x19u16.to_le_bytes());
        let mut count = [0xffu8; 4];
        f.read(DATA, &mut count);
        assert_eq!(count, [0; 4], "an empty file directory");
        f.write(SELECTOR, &ID.to_le_bytes());
        let mut id = [0u8; 4];
        f.read(DATA, &mut id);
        assert_eq!(u32::from_le_bytes(id) & 2, 0, "no DMA");
    }
}
