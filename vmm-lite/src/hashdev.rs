//! The hash device: hashes a range of guest memory for the guest's CHECK request.
//!
//! The guest writes the guest physical address of a 24-byte request (`abi::HASH_*`) to
//! [`abi::PORT_HASH`]; the VMM hashes the range through its own mapping of guest RAM (the same
//! bytes the guest would read, faulted in the same way) and stores the result. It exists
//! because KVM here emulates the guest CPU (about a microsecond per instruction): hashing
//! 64 MiB in guest code would take about a minute.

use crate::abi;
use crate::memory::GuestMemory;

const PAGE: usize = abi::PAGE_SIZE as usize;

/// splitmix64 finaliser.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hash of whole pages: CRC32 of each page, chained with the page's position.
pub fn hash_pages(bytes: &[u8]) -> u64 {
    bytes.chunks(PAGE).enumerate().fold(0, |h, (i, page)| {
        mix(h ^ u64::from(crc32fast::hash(page)) ^ (i as u64) << 32)
    })
}

/// Executes the hash request at guest address `desc`. A request whose range is not RAM (or
/// not page aligned) gets result 0.
pub fn handle(mem: &mut GuestMemory, desc: u64) {
    let (Some(addr), Some(len)) = (
        mem.read_u64(desc + abi::HASH_ADDR_OFFSET),
        mem.read_u64(desc + abi::HASH_LEN_OFFSET),
    ) else {
        log::warn!("hash: request descriptor at {desc:#x} is outside guest RAM");
        return;
    };
    let aligned = addr % abi::PAGE_SIZE == 0 && len % abi::PAGE_SIZE == 0;
    let result = match mem.range(addr, len) {
        Some(bytes) if aligned => hash_pages(bytes),
        _ => {
            log::warn!("hash: bad range {addr:#x}+{len:#x}");
            0
        }
    };
    let _ = mem.write(desc + abi::HASH_RESULT_OFFSET, &result.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_sees_every_byte_and_position() {
        let mut a = vec![0u8; 4 * PAGE];
        let h0 = hash_pages(&a);
        a[3 * PAGE + 17] = 1;
        let h1 = hash_pages(&a);
        assert_ne!(h0, h1);
        // The same page content at another position hashes differently.
        let mut b = vec![0u8; 4 * PAGE];
        b[2 * PAGE + 17] = 1;
        assert_ne!(hash_pages(&b), h1);
    }

    #[test]
    fn request_result_is_written_back() {
        let mut mem = GuestMemory::anonymous(abi::MIN_MEM).unwrap();
        let desc = 0x9000;
        mem.write(desc, &abi::HEAP_ADDR.to_le_bytes()).unwrap();
        mem.write(desc + 8, &(2 * abi::PAGE_SIZE).to_le_bytes())
            .unwrap();
        handle(&mut mem, desc);
        assert_eq!(
            mem.read_u64(desc + abi::HASH_RESULT_OFFSET),
            Some(hash_pages(&[0; 2 * PAGE]))
        );
        mem.write(desc + 8, &(abi::MIN_MEM).to_le_bytes()).unwrap();
        handle(&mut mem, desc);
        assert_eq!(mem.read_u64(desc + abi::HASH_RESULT_OFFSET), Some(0));
    }
}
