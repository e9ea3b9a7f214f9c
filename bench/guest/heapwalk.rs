//! The in-memory program of `bench qemu`'s Linux guest (built with rustc as a
//! static binary and run from the guest's disk): it fills a heap of linked
//! 4 KiB nodes, then answers walks over its hot part.
//!
//! `heapwalk HEAP_MIB HOT_MIB CMD_FIFO REPLY_FIFO`: every node is pseudo-random
//! data (never zero, never on a disk); the hot nodes form one linked cycle in
//! a shuffled order. Each line `walk SEED` on CMD_FIFO walks the whole cycle
//! from a seed-chosen node, reading a cache line of every node, and writes
//! `heap CHECKSUM` to REPLY_FIFO. Both FIFOs stay open (CMD first, then
//! REPLY), so the guest shell holds them as `exec 3>CMD 4<REPLY` and asks
//! with `echo walk 7 >&3; read -r r <&4`. Same pages for every seed, in
//! another order.

use std::io::{BufRead, BufReader, Write};

const NODE_WORDS: usize = 512;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    assert!(args.len() == 5, "usage: heapwalk HEAP_MIB HOT_MIB CMD_FIFO REPLY_FIFO");
    let nodes = args[1].parse::<usize>().unwrap() * 256;
    let hot = (args[2].parse::<usize>().unwrap() * 256).min(nodes);
    let mut heap: Vec<Box<[u64; NODE_WORDS]>> = Vec::with_capacity(nodes);
    let mut rng = 0x5eed_u64;
    for _ in 0..nodes {
        let mut node = Box::new([0u64; NODE_WORDS]);
        for w in node.iter_mut() {
            *w = splitmix(&mut rng) | 1;
        }
        heap.push(node);
    }
    // The hot nodes, shuffled (Fisher-Yates), linked into one cycle through word 0.
    let mut order: Vec<usize> = (0..hot).collect();
    for i in (1..hot).rev() {
        let j = (splitmix(&mut rng) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    for k in 0..hot {
        heap[order[k]][0] = order[(k + 1) % hot] as u64;
    }
    drop(order);
    let cmds = BufReader::new(std::fs::File::open(&args[3]).expect("command fifo"));
    let mut reply = std::fs::OpenOptions::new()
        .write(true)
        .open(&args[4])
        .expect("reply fifo");
    for line in cmds.lines() {
        let line = line.expect("reading a command");
        let Some(seed) = line.strip_prefix("walk ") else { continue };
        let seed: u64 = seed.trim().parse().unwrap_or(0);
        let mut at = (seed as usize).wrapping_mul(2_654_435_761) % hot.max(1);
        let mut sum = 0u64;
        for step in 0..hot {
            let node = &heap[at];
            let line: u64 = node[1..8].iter().fold(0, |a, &w| a ^ w);
            sum = sum.wrapping_add(line.rotate_left((step % 64) as u32));
            at = node[0] as usize;
        }
        writeln!(reply, "heap {sum:016x}").unwrap();
        reply.flush().unwrap();
    }
}
