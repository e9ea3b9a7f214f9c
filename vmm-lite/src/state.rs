//! The VMM state section: what resuming a checkpointed VM needs besides its RAM.
//!
//! Stored as the checkpoint's opaque VMM-state section (and, with `--state-out`, as a file).
//! Layout, little endian:
//!
//! ```text
//! offset      size  field
//! 0           8     magic "VMMLSTAT"
//! 8           4     format version (2)
//! 12          4     CRC32 (IEEE) of bytes [HEADER_SIZE, end)
//! 16          8     J = length of the JSON document
//! 24          8     B = length of the overlay data (4096 x overlay blocks)
//! 32          J     JSON {"vcpu": VcpuState, "devices": DeviceState,
//!                         "binding": [{"page", "crc32"}, ...]}
//!                   (devices.io_tracking: the I/O-tracking map as runs, optional)
//! 32 + J      B     disk overlay blocks, in the order of devices.overlay_offsets
//! ```
//!
//! The vCPU registers are JSON through kvm-bindings' serde support; the disk overlay is
//! binary because it is whole 4 KiB blocks. A reader checks, in order: size, magic, version,
//! lengths, CRC, then parses.
//!
//! Version 2 added `binding`, the pages that tie the state to its memory (see `binding`);
//! a version-1 state is refused, as it cannot be checked against its memory.

use serde::{Deserialize, Serialize};

use crate::binding::PageCrc;
use crate::guest::{DesktopParams, Workload};
use crate::vcpu::VcpuState;

/// "VMMLSTAT".
pub const MAGIC: [u8; 8] = *b"VMMLSTAT";
/// The version this code writes and reads.
pub const VERSION: u32 = 2;
const MAGIC_OFFSET: usize = 0;
const VERSION_OFFSET: usize = MAGIC_OFFSET + MAGIC.len();
const CRC_OFFSET: usize = VERSION_OFFSET + size_of::<u32>();
const JSON_LEN_OFFSET: usize = CRC_OFFSET + size_of::<u32>();
const OVERLAY_LEN_OFFSET: usize = JSON_LEN_OFFSET + size_of::<u64>();
/// Bytes before the JSON document.
pub const HEADER_SIZE: usize = OVERLAY_LEN_OFFSET + size_of::<u64>();
/// Largest state accepted (the overlay is bounded by what the guest writes).
pub const MAX_SIZE: u64 = 1 << 30;
const BLOCK: usize = 4096;

/// Device and machine state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceState {
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// The workload the guest was booted with (informational: the guest's own state is in RAM).
    pub workload: Workload,
    /// The guest PRNG seed it was booted with (informational, as above).
    pub seed: u64,
    /// The desktop parameters it was booted with (desktop only; informational, as above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desktop: Option<DesktopParams>,
    /// Size of the disk image the VM ran with; a restore refuses a different one.
    pub disk_size: u64,
    /// Path of that disk image when the state was saved (informational).
    pub disk_path: String,
    /// Disk byte offsets of the blocks in the overlay, ascending.
    pub overlay_offsets: Vec<u64>,
    /// Requests the guest completed before the state was saved.
    pub requests_served: u64,
    /// The I/O-tracking map (guest pages that hold an unmodified disk block), as runs
    /// `[first page, its disk offset, pages]`; restored with the state so a checkpoint of
    /// the restored VM still gets its disk references as hints. Absent in states saved
    /// before it existed (and with tracking off): an empty map.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub io_tracking: Vec<[u64; 3]>,
}

/// The whole VMM state.
#[derive(Debug)]
pub struct VmState {
    /// vCPU 0.
    pub vcpu: VcpuState,
    /// Devices.
    pub devices: DeviceState,
    /// Contents of the overlay blocks, 4096 bytes each, in `devices.overlay_offsets` order.
    pub overlay: Vec<u8>,
    /// CRC32 of the guest pages that identify the VM at the moment it was saved.
    pub binding: Vec<PageCrc>,
}

#[derive(Serialize, Deserialize)]
struct Document {
    vcpu: VcpuState,
    devices: DeviceState,
    binding: Vec<PageCrc>,
}

/// Why a state section was rejected.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Shorter than the header or longer than [`MAX_SIZE`].
    #[error("{0} bytes is not a plausible VMM state size")]
    Size(u64),
    /// Wrong magic.
    #[error("not a vmm-lite state (bad magic)")]
    Magic,
    /// Unknown version.
    #[error(
        "unsupported state version {0} (this vmm-lite reads version {VERSION}): re-create the \
         checkpoint with this vmm-lite"
    )]
    Version(u32),
    /// Header lengths disagree with the size.
    #[error("truncated or padded: header says {expected} bytes, found {actual}")]
    Length {
        /// Header + JSON + overlay lengths.
        expected: u64,
        /// Actual size.
        actual: u64,
    },
    /// CRC mismatch.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// The JSON document does not parse.
    #[error("malformed state document")]
    Json(#[source] serde_json::Error),
    /// The overlay data does not match its offsets.
    #[error("overlay has {bytes} bytes for {blocks} blocks")]
    Overlay {
        /// Overlay bytes.
        bytes: u64,
        /// Blocks listed.
        blocks: u64,
    },
}

/// Serializes `state`.
pub fn encode(state: &VmState) -> Vec<u8> {
    let doc = DocumentRef {
        vcpu: &state.vcpu,
        devices: &state.devices,
        binding: &state.binding,
    };
    let json = serde_json::to_vec(&doc).expect("state serializes");
    let mut out = Vec::with_capacity(HEADER_SIZE + json.len() + state.overlay.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // CRC, filled below
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&(state.overlay.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&state.overlay);
    let crc = crc32fast::hash(&out[HEADER_SIZE..]);
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    out
}

#[derive(Serialize)]
struct DocumentRef<'a> {
    vcpu: &'a VcpuState,
    devices: &'a DeviceState,
    binding: &'a [PageCrc],
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("in header"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("in header"))
}

/// Parses and validates a state section.
pub fn decode(bytes: &[u8]) -> Result<VmState, StateError> {
    let size = bytes.len() as u64;
    if bytes.len() < HEADER_SIZE || size > MAX_SIZE {
        return Err(StateError::Size(size));
    }
    if bytes[MAGIC_OFFSET..MAGIC_OFFSET + MAGIC.len()] != MAGIC {
        return Err(StateError::Magic);
    }
    let version = u32_at(bytes, VERSION_OFFSET);
    if version != VERSION {
        return Err(StateError::Version(version));
    }
    let json_len = u64_at(bytes, JSON_LEN_OFFSET);
    let overlay_len = u64_at(bytes, OVERLAY_LEN_OFFSET);
    let expected = (HEADER_SIZE as u64)
        .saturating_add(json_len)
        .saturating_add(overlay_len);
    if expected != size {
        return Err(StateError::Length {
            expected,
            actual: size,
        });
    }
    let stored = u32_at(bytes, CRC_OFFSET);
    let computed = crc32fast::hash(&bytes[HEADER_SIZE..]);
    if stored != computed {
        return Err(StateError::Checksum { stored, computed });
    }
    let json_end = HEADER_SIZE + json_len as usize;
    let doc: Document =
        serde_json::from_slice(&bytes[HEADER_SIZE..json_end]).map_err(StateError::Json)?;
    let overlay = bytes[json_end..].to_vec();
    let blocks = doc.devices.overlay_offsets.len() as u64;
    if overlay.len() as u64 != blocks * BLOCK as u64 {
        return Err(StateError::Overlay {
            bytes: overlay.len() as u64,
            blocks,
        });
    }
    Ok(VmState {
        vcpu: doc.vcpu,
        devices: doc.devices,
        overlay,
        binding: doc.binding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let mut vcpu = VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: None,
            msrs: vec![(0x10, 12345)],
            events: Default::default(),
            debugregs: Default::default(),
        };
        vcpu.regs.rip = 0x10_0042;
        vcpu.sregs.cr3 = 0x1000;
        vcpu.xsave.region[7] = 0xdead_beef;
        let devices = DeviceState {
            mem_size: 16 << 20,
            workload: Workload::Mixed,
            seed: 9,
            desktop: None,
            disk_size: 1 << 20,
            disk_path: "disk.img".into(),
            overlay_offsets: vec![0, 8192],
            requests_served: 77,
            io_tracking: vec![[0x200, 0, 64], [0x300, 1 << 20, 2]],
        };
        VmState {
            vcpu,
            devices,
            overlay: vec![5; 2 * BLOCK],
            binding: vec![PageCrc {
                page: 7,
                crc32: 0x1234_5678,
            }],
        }
    }

    #[test]
    fn save_load_round_trip() {
        let bytes = encode(&sample());
        let back = decode(&bytes).unwrap();
        assert_eq!(back.vcpu.regs.rip, 0x10_0042);
        assert_eq!(back.vcpu.sregs.cr3, 0x1000);
        assert_eq!(back.vcpu.xsave.region[7], 0xdead_beef);
        assert_eq!(back.vcpu.msrs, vec![(0x10, 12345)]);
        assert_eq!(back.devices, sample().devices);
        assert_eq!(back.overlay, sample().overlay);
        assert_eq!(back.binding, sample().binding);
    }

    #[test]
    fn a_state_saved_before_the_tracking_map_existed_loads_with_an_empty_map() {
        let mut old = sample();
        old.devices.io_tracking.clear();
        let bytes = encode(&old);
        let json = String::from_utf8_lossy(&bytes[HEADER_SIZE..]);
        assert!(!json.contains("io_tracking"));
        assert!(decode(&bytes).unwrap().devices.io_tracking.is_empty());
    }

    #[test]
    fn header_fields_are_where_the_doc_says() {
        let bytes = encode(&sample());
        assert_eq!(&bytes[0..8], b"VMMLSTAT"); // magic
        assert_eq!(&bytes[8..12], &[2, 0, 0, 0]); // version 2
        let json_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        assert_eq!(&bytes[24..32], &(2 * BLOCK as u64).to_le_bytes()); // overlay length
        assert_eq!(bytes[32], b'{'); // JSON starts right after the 32-byte header
        assert_eq!(bytes.len() as u64, 32 + json_len + 2 * BLOCK as u64);
    }

    #[test]
    fn each_kind_of_damage_has_its_own_error() {
        let good = encode(&sample());
        assert!(matches!(decode(&good[..10]), Err(StateError::Size(10))));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad), Err(StateError::Magic)));
        let mut bad = good.clone();
        bad[8] = 9;
        assert!(matches!(decode(&bad), Err(StateError::Version(9))));
        let mut old = good.clone();
        old[8] = 1;
        let err = decode(&old).unwrap_err().to_string();
        assert!(
            err.contains("version 1") && err.contains("re-create the checkpoint"),
            "{err}"
        );
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(StateError::Length { .. })
        ));
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(decode(&bad), Err(StateError::Checksum { .. })));
    }

    #[test]
    fn garbage_never_panics() {
        for len in [0, 1, 31, 32, 33, 100] {
            let _ = decode(&vec![0xa5; len]);
        }
        let mut fake = vec![0; HEADER_SIZE];
        fake[..8].copy_from_slice(&MAGIC);
        fake[8] = VERSION as u8;
        fake[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&fake), Err(StateError::Length { .. })));
    }
}
