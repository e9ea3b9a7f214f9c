//! The mutator: a few random edits of a valid file, biased towards the
//! places parsers trust (header fields, sizes, offsets) and the values that
//! break them (0, 1, all ones, the file's length, powers of two).

use ckptfs::synth::Rng;

/// Header fields of a format: byte offset and width (4 or 8) of each number,
/// and where the header's own CRC sits (recomputed after a field edit so the
/// edit reaches the checks behind it; `None`: no header CRC).
#[derive(Clone, Debug, Default)]
pub struct Fields {
    /// (offset, width) of every numeric field.
    pub numbers: Vec<(usize, usize)>,
    /// (covered bytes, CRC offset) of the header CRC.
    pub header_crc: Option<(usize, usize)>,
}

/// Values that break size and offset arithmetic.
fn interesting(rng: &mut Rng, len: u64) -> u64 {
    let v = [
        0,
        1,
        u64::MAX,
        u64::MAX / 2,
        u32::MAX as u64,
        len,
        len.wrapping_sub(1),
        len + 1,
        4096,
        1 << 28,
        1 << 32,
        1 << 40,
        1 << 63,
    ];
    let pick = v[rng.below(v.len() as u64) as usize];
    if rng.below(4) == 0 {
        pick.wrapping_add(rng.below(9)).wrapping_sub(4)
    } else {
        pick
    }
}

fn put(buf: &mut [u8], at: usize, width: usize, v: u64) {
    if at + width <= buf.len() {
        buf[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
    }
}

/// Apply 1 to 4 random edits to `data`; returns what kind of edit happened
/// (for the summary).
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, fields: &Fields) -> &'static str {
    let edits = 1 + rng.below(4);
    let mut kind = "bytes";
    let mut header_edited = false;
    for _ in 0..edits {
        let len = data.len() as u64;
        match rng.below(10) {
            0..=2 if !data.is_empty() => {
                let at = rng.below(len) as usize;
                data[at] ^= 1 << rng.below(8);
            }
            3 if !data.is_empty() => {
                let at = rng.below(len) as usize;
                data[at] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5) as usize];
            }
            4..=6 if !fields.numbers.is_empty() => {
                let (at, width) = fields.numbers[rng.below(fields.numbers.len() as u64) as usize];
                let v = interesting(rng, len);
                put(data, at, width, v);
                header_edited = true;
                kind = "header field";
            }
            7 if !data.is_empty() => {
                let at = rng.below(len) as usize;
                let v = interesting(rng, len);
                put(data, at, [4, 8][rng.below(2) as usize], v);
            }
            8 => {
                data.truncate(rng.below(len + 1) as usize);
                kind = "truncated";
            }
            _ => {
                let n = 1 + rng.below(8192) as usize;
                let mut extra = vec![0u8; n];
                if rng.below(2) == 0 {
                    rng.fill(&mut extra);
                }
                data.extend_from_slice(&extra);
                kind = "extended";
            }
        }
    }
    // A hostile file has a valid header CRC: recompute it (most of the time)
    // so edits of the fields reach the checks behind the CRC.
    if let Some((covered, at)) = fields.header_crc
        && header_edited
        && rng.below(4) != 0
        && data.len() >= at + 4
    {
        let crc = crc32fast::hash(&data[..covered]);
        data[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    }
    kind
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_edits_keep_a_valid_header_crc_most_of_the_time() {
        let fields = Fields {
            numbers: vec![(8, 8)],
            header_crc: Some((16, 16)),
        };
        let mut rng = Rng::new(3);
        let mut fixed = 0;
        for _ in 0..200 {
            let mut d = vec![0u8; 64];
            if mutate(&mut rng, &mut d, &fields) == "header field" && d.len() >= 20 {
                let crc = u32::from_le_bytes(d[16..20].try_into().unwrap());
                fixed += u32::from(crc == crc32fast::hash(&d[..16]));
            }
        }
        assert!(fixed > 20, "{fixed}");
    }
}
