//! The head of a QEMU migration stream: what a restore must match.
//!
//! A checkpoint's VMM-state section holds QEMU's device state, saved by a
//! migration with `x-ignore-shared`. Its first bytes name the machine type,
//! the capabilities both sides must agree on, and every RAM block with its
//! size, so a restore can build the memory backend without being told:
//!
//! ```text
//! be32 magic "QEVM" | be32 version 3
//! u8 0x07 CONFIGURATION | be32 len | machine type ("pc-i440fx-7.2")
//!   { u8 0x05 SUBSECTION | u8 len | name | be32 version | fields }*
//!     "configuration/capabilities": be32 count, { u8 len | name }*
//! u8 0x01 SECTION_START | be32 section id | u8 len | "ram" | be32 instance | be32 version
//!   be64 total RAM bytes | 0x04 (RAM_SAVE_FLAG_MEM_SIZE)
//!   { u8 len | block id | be64 used length | [be64 guest address: x-ignore-shared] }*
//! ... pages of the RAM blocks not ignored, then the devices
//! ```
//!
//! (QEMU 7.2 `migration/savevm.c` and `migration/ram.c`; the block list is
//! checked by its sizes adding up to the total.)

/// `QEVM`.
const MAGIC: u32 = 0x5145_564d;
/// The stream version QEMU has written since 2009.
const VERSION: u32 = 3;
const VM_CONFIGURATION: u8 = 0x07;
const VM_SUBSECTION: u8 = 0x05;
const VM_SECTION_START: u8 = 0x01;
/// Flag in the low bits of the first RAM word.
const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
/// RAM flags live in the bits below the target page size.
const RAM_FLAG_MASK: u64 = 0xfff;

/// The capability that leaves shared file-backed RAM out of the stream.
pub const IGNORE_SHARED: &str = "x-ignore-shared";

/// What the head of a migration stream says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHead {
    /// Machine type, e.g. `pc-i440fx-7.2` (absent when QEMU sent no configuration).
    pub machine: Option<String>,
    /// Capabilities the destination must also set (QEMU sends only those it validates).
    pub capabilities: Vec<String>,
    /// RAM blocks, in stream order.
    pub ram_blocks: Vec<RamBlock>,
}

/// One RAM block of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    /// QEMU's block id: a memory backend's id (`pc.ram`), or a device's ROM or RAM.
    pub id: String,
    /// Bytes.
    pub size: u64,
}

impl StreamHead {
    /// Whether the stream was saved with `x-ignore-shared`.
    pub fn ignores_shared(&self) -> bool {
        self.capabilities.iter().any(|c| c == IGNORE_SHARED)
    }

    /// The RAM blocks of exactly `size` bytes (the guest RAM a checkpoint holds).
    pub fn blocks_of_size(&self, size: u64) -> Vec<&RamBlock> {
        self.ram_blocks.iter().filter(|b| b.size == size).collect()
    }
}

/// Why a VMM state is not a usable QEMU migration stream head.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// Too short, or the magic is wrong.
    #[error("not a QEMU migration stream (no QEVM magic)")]
    Magic,
    /// A stream version other than 3.
    #[error("QEMU migration stream version {0}, expected 3")]
    Version(u32),
    /// Cut short at `at`.
    #[error("QEMU migration stream ends at byte {0}, inside its head")]
    Truncated(usize),
    /// Something this parser does not know, at byte `at`.
    #[error("QEMU migration stream: {what} at byte {at}")]
    Unexpected {
        /// What was found.
        what: String,
        /// Where.
        at: usize,
    },
}

/// A cursor over the stream's bytes.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StreamError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(StreamError::Truncated(self.b.len()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, StreamError> {
        Ok(self.take(1)?[0])
    }

    fn be32(&mut self) -> Result<u32, StreamError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn be64(&mut self) -> Result<u64, StreamError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A string of `len` bytes (UTF-8 lossily: names are ASCII).
    fn string(&mut self, len: usize) -> Result<String, StreamError> {
        Ok(String::from_utf8_lossy(self.take(len)?).into_owned())
    }

    /// A string with a one-byte length.
    fn string8(&mut self) -> Result<String, StreamError> {
        let len = self.u8()? as usize;
        self.string(len)
    }

    fn unexpected(&self, what: String) -> StreamError {
        StreamError::Unexpected { what, at: self.at }
    }
}

/// Parse the head of a migration stream.
pub fn parse(bytes: &[u8]) -> Result<StreamHead, StreamError> {
    let mut c = Cursor { b: bytes, at: 0 };
    if bytes.len() < 8 || c.be32()? != MAGIC {
        return Err(StreamError::Magic);
    }
    let version = c.be32()?;
    if version != VERSION {
        return Err(StreamError::Version(version));
    }
    let mut head = StreamHead {
        machine: None,
        capabilities: Vec::new(),
        ram_blocks: Vec::new(),
    };
    let mut kind = c.u8()?;
    if kind == VM_CONFIGURATION {
        let len = c.be32()? as usize;
        head.machine = Some(c.string(len)?);
        kind = c.u8()?;
        while kind == VM_SUBSECTION {
            read_config_subsection(&mut c, &mut head)?;
            kind = c.u8()?;
        }
    }
    if kind != VM_SECTION_START {
        return Err(c.unexpected(format!("section type {kind:#x} instead of the RAM section")));
    }
    let _section_id = c.be32()?;
    let name = c.string8()?;
    if name != "ram" {
        return Err(c.unexpected(format!("section {name:?} before the RAM section")));
    }
    let _instance = c.be32()?;
    let _version = c.be32()?;
    head.ram_blocks = read_ram_blocks(&mut c, head.ignores_shared())?;
    Ok(head)
}

/// One subsection of the configuration: capabilities are kept, the known
/// others skipped.
fn read_config_subsection(c: &mut Cursor, head: &mut StreamHead) -> Result<(), StreamError> {
    let name = c.string8()?;
    let _version = c.be32()?;
    match name.as_str() {
        "configuration/capabilities" => {
            let count = c.be32()?;
            for _ in 0..count {
                head.capabilities.push(c.string8()?);
            }
        }
        "configuration/target-page-bits" => {
            c.be32()?;
        }
        "configuration/uuid" => {
            c.take(16)?;
        }
        _ => return Err(c.unexpected(format!("configuration subsection {name:?}"))),
    }
    Ok(())
}

/// The RAM section's block list; each block carries its guest address when
/// `x-ignore-shared` is on.
fn read_ram_blocks(c: &mut Cursor, with_addr: bool) -> Result<Vec<RamBlock>, StreamError> {
    let first = c.be64()?;
    if first & RAM_SAVE_FLAG_MEM_SIZE == 0 {
        return Err(c.unexpected(format!(
            "RAM flags {:#x} without MEM_SIZE",
            first & RAM_FLAG_MASK
        )));
    }
    let total = first & !RAM_FLAG_MASK;
    let mut blocks = Vec::new();
    let mut sum = 0u64;
    while sum < total {
        let id = c.string8()?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(c.unexpected(format!("RAM block id {id:?}")));
        }
        let size = c.be64()?;
        if with_addr {
            c.be64()?;
        }
        sum = sum.saturating_add(size);
        blocks.push(RamBlock { id, size });
    }
    if sum != total {
        return Err(c.unexpected(format!("RAM blocks adding up to {sum} bytes, not {total}")));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head QEMU 7.2 wrote for `-m 64M -object memory-backend-file,id=pc.ram,...`
    /// with x-ignore-shared, cut after the block list (blocks shortened to two).
    fn qemu72_head(ignore_shared: bool) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(MAGIC.to_be_bytes());
        b.extend(3u32.to_be_bytes());
        b.push(VM_CONFIGURATION);
        b.extend(13u32.to_be_bytes()); // machine type length
        b.extend(b"pc-i440fx-7.2");
        if ignore_shared {
            b.push(VM_SUBSECTION);
            b.push(26);
            b.extend(b"configuration/capabilities");
            b.extend(1u32.to_be_bytes()); // subsection version
            b.extend(1u32.to_be_bytes()); // one capability
            b.push(15);
            b.extend(b"x-ignore-shared");
        }
        b.push(VM_SECTION_START);
        b.extend(2u32.to_be_bytes()); // section id
        b.push(3);
        b.extend(b"ram");
        b.extend(0u32.to_be_bytes()); // instance
        b.extend(4u32.to_be_bytes()); // version
        let total: u64 = (64 << 20) + (256 << 10);
        b.extend((total | RAM_SAVE_FLAG_MEM_SIZE).to_be_bytes());
        for (id, size, addr) in [
            ("pc.ram", 64u64 << 20, 0u64),
            ("pc.bios", 256 << 10, 0xfffc_0000),
        ] {
            b.push(id.len() as u8);
            b.extend(id.as_bytes());
            b.extend(size.to_be_bytes());
            if ignore_shared {
                b.extend(addr.to_be_bytes());
            }
        }
        b.extend([0x00, 0x00, 0x00, 0x10]); // whatever follows (RAM_SAVE_FLAG_EOS ...)
        b
    }

    #[test]
    fn qemu72_head_gives_machine_capabilities_and_blocks() {
        let h = parse(&qemu72_head(true)).unwrap();
        assert_eq!(h.machine.as_deref(), Some("pc-i440fx-7.2"));
        assert!(h.ignores_shared());
        assert_eq!(
            h.ram_blocks,
            vec![
                RamBlock {
                    id: "pc.ram".into(),
                    size: 64 << 20
                },
                RamBlock {
                    id: "pc.bios".into(),
                    size: 256 << 10
                }
            ]
        );
        assert_eq!(h.blocks_of_size(64 << 20)[0].id, "pc.ram");
    }

    #[test]
    fn stream_without_ignore_shared_parses_and_says_so() {
        let h = parse(&qemu72_head(false)).unwrap();
        assert!(!h.ignores_shared());
        assert_eq!(h.ram_blocks.len(), 2);
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        assert_eq!(parse(b""), Err(StreamError::Magic));
        assert_eq!(parse(b"ELF\0\0\0\0\0\0\0"), Err(StreamError::Magic));
        let full = qemu72_head(true);
        for n in 8..full.len() - 4 {
            assert!(parse(&full[..n]).is_err(), "{n} bytes parsed");
        }
        let mut v = full.clone();
        v[7] = 2;
        assert_eq!(parse(&v), Err(StreamError::Version(2)));
    }
}
