//! What the i440fx maps where: guest-physical memory as a function of the PAM registers (config
//! 0x59-0x5f) and SMRAM (0x72), as QEMU's `pam.c` and `i440fx.c` lay it out, except that PAM
//! mode 1 is read-only here (QEMU 7.2's KVM slot for it is writable).

/// 0xc0000: the first byte the PAM registers cover.
pub const PAM_START: u64 = 0xc_0000;
/// 0xf0000-0xfffff: the BIOS segment, PAM register 0x59's high nibble.
pub const BIOS_SEGMENT: u64 = 0xf_0000;
/// 1 MiB: the end of what the PAM registers cover.
pub const PAM_END: u64 = 0x10_0000;
/// The size of each 0xc0000-0xeffff piece (one nibble each).
pub const PAM_PIECE: u64 = 0x4000;
/// How many PAM pieces there are: the BIOS segment and twelve 16 KiB pieces.
pub const PAM_PIECES: usize = 13;
/// Config-space offset of the first PAM register.
pub const PAM_REG: u8 = 0x59;
/// Config-space offset of the SMRAM register.
pub const SMRAM_REG: u8 = 0x72;
/// The size of `pc.rom`, the read-only memory QEMU shows at 0xc0000-0xdffff in PAM mode 0.
pub const ROM_SIZE: u64 = 0x2_0000;
/// The part of the BIOS image shown at 0xe0000-0xfffff in PAM mode 0 ("isa-bios").
pub const ISA_BIOS_SIZE: u64 = 0x2_0000;
/// 4 GiB: the BIOS image ends here.
pub const FOUR_GIB: u64 = 1 << 32;

/// Where a guest-physical range's memory comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Guest RAM.
    Ram,
    /// The BIOS image.
    Bios,
    /// `pc.rom`: what 0xc0000-0xdffff shows in PAM mode 0 (zeros: no option ROMs).
    Rom,
}

impl Source {
    /// The name used in reports and map comparisons (QEMU's names).
    pub fn name(self) -> &'static str {
        match self {
            Source::Ram => "pc.ram",
            Source::Bios => "pc.bios",
            Source::Rom => "pc.rom",
        }
    }
}

/// One guest-physical range and what it maps.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Piece {
    /// First byte.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// The memory.
    pub source: Source,
    /// Offset of the first byte in that memory.
    pub offset: u64,
    /// Guest writes exit (ROM, or RAM the PAM made read-only).
    pub readonly: bool,
}

impl Piece {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// Whether `gpa` is inside.
    pub fn contains(&self, gpa: u64) -> bool {
        self.gpa <= gpa && gpa < self.end()
    }
}

/// The guest-physical range of PAM piece `i` (0: the BIOS segment; 1-12: 16 KiB from 0xc0000).
pub fn piece_range(i: usize) -> (u64, u64) {
    match i {
        0 => (BIOS_SEGMENT, PAM_END - BIOS_SEGMENT),
        _ => (PAM_START + (i as u64 - 1) * PAM_PIECE, PAM_PIECE),
    }
}

/// The mode (bit 0 read enable, bit 1 write enable) of PAM piece `i`; `pam[k]` is register
/// `0x59 + k`. Piece 0 is 0x59's high nibble; piece `i` is register `0x59 + (i + 1) / 2`, its low
/// nibble for odd `i`, high for even.
pub fn mode(pam: &[u8; 7], i: usize) -> u8 {
    let (reg, high) = match i {
        0 => (0, true),
        _ => (i.div_ceil(2), i % 2 == 0),
    };
    (if high { pam[reg] >> 4 } else { pam[reg] }) & 3
}

/// The PAM piece holding `gpa`, if the PAM covers it.
pub fn piece_of(gpa: u64) -> Option<usize> {
    match gpa {
        BIOS_SEGMENT..PAM_END => Some(0),
        PAM_START..BIOS_SEGMENT => Some(1 + ((gpa - PAM_START) / PAM_PIECE) as usize),
        _ => None,
    }
}

/// Guest memory, sorted by address, for these register values, `ram` bytes of RAM (from 0) and a
/// BIOS image of `bios` bytes (at most 4 GiB, at least [`ISA_BIOS_SIZE`]).
///
/// - 0-0xbffff: RAM. 0xa0000-0xbffff is the VGA window, which SMRAM's D_OPEN clear routes to PCI;
///   this machine has no VGA, so PCI space there is empty and RAM shows through either way, as in
///   QEMU. SMRAM therefore changes nothing in address space 0 (its SMM side, address space 1,
///   is not modelled: this kernel has one address space and Debian's `bios.bin` has no SMM code).
/// - 0xc0000-0xfffff, per PAM piece: mode 0 ROM (`pc.rom` below 0xe0000, the last 128 KiB of
///   the BIOS above), mode 1 RAM read-only (QEMU 7.2: writable), modes 2 and 3 RAM (mode 2 should
///   read ROM and write RAM, which one KVM slot cannot express; QEMU maps RAM too).
/// - 1 MiB to `ram`: RAM. The BIOS at `4 GiB - bios`, read-only.
pub fn memory_map(pam: &[u8; 7], _smram: u8, ram: u64, bios: u64) -> Vec<Piece> {
    let rw = |gpa, size| Piece {
        gpa,
        size,
        source: Source::Ram,
        offset: gpa,
        readonly: false,
    };
    let mut map = vec![rw(0, PAM_START)];
    // Pieces in address order: 1..=12, then the BIOS segment.
    for i in (1..PAM_PIECES).chain([0]) {
        let (gpa, size) = piece_range(i);
        map.push(match mode(pam, i) {
            0 if gpa < 0xe_0000 => Piece {
                source: Source::Rom,
                offset: gpa - PAM_START,
                readonly: true,
                ..rw(gpa, size)
            },
            0 => Piece {
                source: Source::Bios,
                offset: bios - ISA_BIOS_SIZE + (gpa - 0xe_0000),
                readonly: true,
                ..rw(gpa, size)
            },
            1 => Piece {
                readonly: true,
                ..rw(gpa, size)
            },
            _ => rw(gpa, size),
        });
    }
    map.push(rw(PAM_END, ram - PAM_END));
    map.push(Piece {
        source: Source::Bios,
        offset: 0,
        readonly: true,
        ..rw(FOUR_GIB - bios, bios)
    });
    map
}

/// The piece of `map` holding `gpa`.
pub fn lookup(map: &[Piece], gpa: u64) -> Option<&Piece> {
    let i = map.partition_point(|p| p.end() <= gpa);
    map.get(i).filter(|p| p.contains(gpa))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 512 << 20;
    const BIOS: u64 = 128 << 10;

    #[test]
    fn nibbles_follow_qemus_pam_update() {
        // 0x5a low = 0xc0000, 0x5a high = 0xc4000, ..., 0x5f high = 0xec000; 0x59 high = 0xf0000.
        let mut pam = [0u8; 7];
        pam[1] = 0x21;
        pam[6] = 0x30;
        pam[0] = 0x1f;
        assert_eq!(mode(&pam, 1), 1);
        assert_eq!(mode(&pam, 2), 2);
        assert_eq!(mode(&pam, 12), 3);
        assert_eq!(mode(&pam, 11), 0);
        assert_eq!(mode(&pam, 0), 1, "0x59's low nibble is unused");
        assert_eq!(piece_range(12), (0xe_c000, 0x4000));
        assert_eq!(piece_of(0xe_c123), Some(12));
        assert_eq!(piece_of(0xf_ffff), Some(0));
        assert_eq!(piece_of(0xb_ffff), None);
    }

    #[test]
    fn reset_maps_rom_and_the_bios_alias_read_only() {
        let map = memory_map(&[0; 7], 0x02, RAM, BIOS);
        let at = |gpa| *lookup(&map, gpa).unwrap();
        assert_eq!(
            (at(0xa_0000).source, at(0xa_0000).readonly),
            (Source::Ram, false)
        );
        assert_eq!(
            (at(0xc_8000).source, at(0xc_8000).offset),
            (Source::Rom, 0x8000)
        );
        let f = at(0xf_0000);
        assert_eq!(
            (f.source, f.offset, f.readonly),
            (Source::Bios, 0x1_0000, true)
        );
        // The reset vector is the image's last 16 bytes.
        let top = at(0xffff_fff0);
        assert_eq!(
            (top.source, top.offset + (0xffff_fff0 - top.gpa)),
            (Source::Bios, BIOS - 0x10)
        );
        assert!(lookup(&map, RAM).is_none());
        assert!(lookup(&map, 0xfec0_0000).is_none());
        // Contiguous from 0 to the end of RAM.
        for w in map.windows(2).take(map.len() - 2) {
            assert_eq!(w[0].end(), w[1].gpa);
        }
    }

    #[test]
    fn seabios_read_only_step_leaves_mode_1_read_only_ram() {
        // make_bios_readonly: 0x58 <- 0x11111000, 0x5c <- 0x31111111.
        let pam = [0x10, 0x11, 0x11, 0x11, 0x11, 0x11, 0x31];
        let map = memory_map(&pam, 0x02, RAM, BIOS);
        for gpa in (PAM_START..PAM_END).step_by(0x1000) {
            let p = lookup(&map, gpa).unwrap();
            assert_eq!(p.source, Source::Ram);
            assert_eq!(p.offset + (gpa - p.gpa), gpa);
            assert_eq!(p.readonly, !(0xe_c000..0xf_0000).contains(&gpa), "{gpa:#x}");
        }
    }
}
