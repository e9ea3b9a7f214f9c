//! The virtual machine: KVM VM + guest RAM + devices, and the run loop with one handler per
//! kind of exit.
//!
//! Devices (port I/O, see `abi`): the serial log, the block device, the hash device, and the
//! request/response ports that connect the guest to a [`Driver`].

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use ckptfs::PageSet;
use kvm_ioctls::{VcpuExit, VmFd};

use crate::abi;
use crate::binding::{self, BindingError};
use crate::block::{BlockDevice, BlockError, DirtyLog};
use crate::driver::Driver;
use crate::guest::{self, BootParams, DesktopParams, Workload};
use crate::hashdev;
use crate::memory::GuestMemory;
use crate::state::{DeviceState, VmState};
use crate::vcpu::{KvmVm, RAM_SLOT, VcpuError};

/// How often the run loop applies the dirty log to the I/O tracker (besides before every
/// disk read and before a checkpoint), so the kernel's bitmap never holds much history.
const HARVEST_INTERVAL: Duration = Duration::from_secs(1);
/// Guest log lines kept for error messages.
const KEPT_LOG_LINES: usize = 8;

/// Errors from running the VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// KVM setup or vCPU state.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The block device.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// KVM_RUN failed. EFAULT means guest RAM could not be faulted in (a file-backed RAM
    /// page whose FUSE daemon stopped, for example).
    #[error("KVM_RUN failed at rip {rip:#x}")]
    Run {
        /// Guest rip, if readable.
        rip: u64,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest executed `hlt` (it does so after a panic).
    #[error("guest stopped (hlt at rip {rip:#x}); last guest log: {log}")]
    Halted {
        /// Guest rip.
        rip: u64,
        /// Last lines of the guest log.
        log: String,
    },
    /// An exit this VMM does not handle (e.g. a triple fault shows as shutdown).
    #[error("unexpected VM exit {exit} at rip {rip:#x}; last guest log: {log}")]
    UnexpectedExit {
        /// The exit, debug-formatted.
        exit: String,
        /// Guest rip.
        rip: u64,
        /// Last lines of the guest log.
        log: String,
    },
    /// A guest RAM page could not be faulted in.
    #[error(
        "guest RAM at {addr:#x} could not be read (rip {rip:#x}): the memory file shrank or the \
         FUSE daemon serving it stopped"
    )]
    RamUnavailable {
        /// Guest physical address.
        addr: u64,
        /// Guest rip.
        rip: u64,
    },
    /// Completing the pending I/O before a pause did not behave as documented.
    #[error("completing the pending I/O exit before pausing")]
    Pause(#[source] io::Error),
    /// Guest RAM does not hold the pages the state was saved with.
    #[error("the state does not belong to this guest RAM")]
    NotThisMemory(#[source] BindingError),
    /// Harvesting the dirty log failed.
    #[error("harvesting the dirty log")]
    DirtyLog(#[source] io::Error),
}

/// KVM_GET_DIRTY_LOG on the RAM slot; every harvest is also added to `seen` (KVM clears
/// its bitmap on each harvest, and an incremental checkpoint needs every write since the
/// start).
struct KvmDirtyLog<'a> {
    vm: &'a VmFd,
    size: u64,
    seen: &'a mut PageSet,
}

impl DirtyLog for KvmDirtyLog<'_> {
    fn harvest(&mut self) -> io::Result<Vec<u64>> {
        let bitmap = self
            .vm
            .get_dirty_log(RAM_SLOT, self.size as usize)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        self.seen.insert_words(&bitmap);
        Ok(bitmap)
    }
}

/// The guest's log, line by line, at debug level.
#[derive(Default)]
struct SerialLog {
    line: Vec<u8>,
    last: VecDeque<String>,
}

impl SerialLog {
    fn push(&mut self, byte: u8) {
        if byte != b'\n' {
            self.line.push(byte);
            return;
        }
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        log::debug!("guest: {line}");
        if self.last.len() == KEPT_LOG_LINES {
            self.last.pop_front();
        }
        self.last.push_back(line);
    }

    fn recent(&self) -> String {
        let mut lines: Vec<&str> = self.last.iter().map(String::as_str).collect();
        let partial = String::from_utf8_lossy(&self.line);
        if !partial.is_empty() {
            lines.push(&partial);
        }
        if lines.is_empty() {
            "(none)".to_string()
        } else {
            lines.join(" | ")
        }
    }
}

/// A VM: vCPU, RAM and devices. Field order is drop order: KVM before the RAM it maps.
pub struct Machine {
    kvm: KvmVm,
    mem: GuestMemory,
    block: BlockDevice,
    serial: SerialLog,
    response_hi: u32,
    tracking: bool,
    last_harvest: Instant,
    guest: GuestInfo,
    requests_served: u64,
    /// Flag the next request with `REQ_NEW_SESSION` (set by a restore).
    new_session: bool,
    /// Pages KVM's dirty log reported written since the machine started (tracking only).
    guest_written: PageSet,
}

/// The pages a machine wrote since it started ([`Machine::written_pages`]).
#[derive(Clone, Debug)]
pub struct WrittenPages {
    /// Pages KVM's dirty log reported (the guest's writes, page-table updates included).
    pub by_guest: u64,
    /// Pages this VMM wrote into guest RAM.
    pub by_vmm: u64,
    /// Both.
    pub all: PageSet,
}

/// What the guest was booted with (saved with the state, informational).
#[derive(Clone, Copy, Debug)]
struct GuestInfo {
    workload: Workload,
    seed: u64,
    desktop: Option<DesktopParams>,
}

impl Machine {
    /// Loads the guest into fresh `mem` and sets the vCPU at its entry point. Disk reads are
    /// tracked when `block` was opened with tracking (dirty logging is then on).
    pub fn boot(
        mut mem: GuestMemory,
        block: BlockDevice,
        params: &BootParams,
    ) -> Result<Self, MachineError> {
        guest::load(&mut mem, params);
        let tracking = block.tracker().is_some();
        let kvm = KvmVm::new(&mut mem, tracking)?;
        kvm.set_boot_registers(guest::boot_sregs, &guest::boot_regs())?;
        log::info!(
            "vmm: booting {:?} guest with {} MiB RAM, disk {} ({} MiB)",
            params.workload,
            mem.size() >> 20,
            block.path().display(),
            block.size() >> 20
        );
        let info = GuestInfo {
            workload: params.workload,
            seed: params.seed,
            desktop: (params.workload == Workload::Desktop).then_some(params.desktop),
        };
        Ok(Self::assemble(kvm, mem, block, info, 0))
    }

    /// A VM resuming `state` over `mem` (which holds the checkpointed RAM), in session
    /// `session` (the request seed the guest mixes into its page choices; 0 = as at the
    /// checkpoint). Refuses memory that does not hold the pages the state was saved with.
    pub fn restore(
        mut mem: GuestMemory,
        mut block: BlockDevice,
        state: &VmState,
        session: u64,
    ) -> Result<Self, MachineError> {
        binding::verify(&mem, state.vcpu.regs.rsp, &state.binding)
            .map_err(MachineError::NotThisMemory)?;
        guest::set_session(&mut mem, session);
        let dev = &state.devices;
        block.check_size(dev.disk_size)?;
        let blocks: Vec<_> = dev
            .overlay_offsets
            .iter()
            .zip(state.overlay.chunks_exact(abi::PAGE_SIZE as usize))
            .map(|(&o, d)| (ckptfs::DiskOffset(o), d))
            .collect();
        block.load_overlay(&blocks)?;
        let ram_pages = mem.size() / abi::PAGE_SIZE;
        if let Some(tracker) = block.tracker_mut() {
            tracker
                .load_runs(&dev.io_tracking, ram_pages, dev.disk_size)
                .map_err(BlockError::BadTracking)?;
        }
        let tracking = block.tracker().is_some();
        let kvm = KvmVm::new(&mut mem, tracking)?;
        kvm.restore(&state.vcpu)?;
        let info = GuestInfo {
            workload: dev.workload,
            seed: dev.seed,
            desktop: dev.desktop,
        };
        let mut machine = Self::assemble(kvm, mem, block, info, dev.requests_served);
        machine.new_session = true;
        Ok(machine)
    }

    fn assemble(
        kvm: KvmVm,
        mem: GuestMemory,
        block: BlockDevice,
        guest: GuestInfo,
        requests_served: u64,
    ) -> Self {
        let pages = mem.size() / abi::PAGE_SIZE;
        Machine {
            kvm,
            mem,
            tracking: block.tracker().is_some(),
            block,
            serial: SerialLog::default(),
            response_hi: 0,
            last_harvest: Instant::now(),
            guest,
            requests_served,
            new_session: false,
            guest_written: PageSet::new(pages),
        }
    }

    /// Guest RAM (stable: the vCPU only runs inside [`Self::run`]).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The block device (and its I/O tracker).
    pub fn block(&self) -> &BlockDevice {
        &self.block
    }

    /// Requests the guest has completed, counting those before a restore.
    pub fn requests_served(&self) -> u64 {
        self.requests_served
    }

    /// Runs the vCPU, serving `driver`, until the driver asks to pause after a response.
    /// On return the vCPU is at an instruction boundary with no I/O pending.
    pub fn run(&mut self, driver: &mut dyn Driver) -> Result<(), MachineError> {
        loop {
            match self.kvm.vcpu.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    let value = if port == abi::PORT_REQUEST {
                        let session = std::mem::take(&mut self.new_session);
                        driver.next_request() | if session { abi::REQ_NEW_SESSION } else { 0 }
                    } else {
                        log::warn!("vmm: guest read from unknown port {port:#x}");
                        u32::MAX
                    };
                    let n = data.len().min(4);
                    data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    let mut bytes = [0u8; 4];
                    let n = data.len().min(4);
                    bytes[..n].copy_from_slice(&data[..n]);
                    if !self.on_io_out(port, u32::from_le_bytes(bytes), driver)? {
                        return self.pause();
                    }
                }
                Ok(VcpuExit::Hlt) => return Err(self.on_halt()),
                Ok(VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _)) => {
                    return Err(self.on_mmio(addr));
                }
                Ok(VcpuExit::Intr) => {}
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // union member the kernel filled in.
                    let internal = unsafe { self.kvm.vcpu.get_kvm_run().__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    let exit = format!(
                        "internal error {} {:x?}",
                        internal.suberror,
                        &internal.data[..n]
                    );
                    return Err(self.on_unexpected_exit(exit));
                }
                Ok(other) => {
                    let exit = format!("{other:?}");
                    return Err(self.on_unexpected_exit(exit));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(source) => {
                    return Err(MachineError::Run {
                        rip: self.rip(),
                        source,
                    });
                }
            }
        }
    }

    /// Handles an `out`; returns false when the driver wants to pause.
    fn on_io_out(
        &mut self,
        port: u16,
        value: u32,
        driver: &mut dyn Driver,
    ) -> Result<bool, MachineError> {
        match port {
            abi::PORT_SERIAL => self.serial.push(value as u8),
            abi::PORT_BLOCK => self.on_block_request(u64::from(value))?,
            abi::PORT_HASH => hashdev::handle(&mut self.mem, u64::from(value)),
            abi::PORT_RESPONSE_HI => self.response_hi = value,
            abi::PORT_RESPONSE => return self.on_response(value, driver),
            _ => log::warn!("vmm: guest wrote {value:#x} to unknown port {port:#x}"),
        }
        Ok(true)
    }

    fn on_block_request(&mut self, desc: u64) -> Result<(), MachineError> {
        let mut dirty = KvmDirtyLog {
            vm: &self.kvm.vm,
            size: self.mem.size(),
            seen: &mut self.guest_written,
        };
        self.block.handle(&mut self.mem, desc, &mut dirty)?;
        Ok(())
    }

    fn on_response(&mut self, low: u32, driver: &mut dyn Driver) -> Result<bool, MachineError> {
        let response = u64::from(self.response_hi) << 32 | u64::from(low);
        self.response_hi = 0;
        self.requests_served += 1;
        if self.tracking && self.last_harvest.elapsed() >= HARVEST_INTERVAL {
            self.harvest_dirty_log()?;
        }
        Ok(driver.completed(response))
    }

    fn on_halt(&self) -> MachineError {
        MachineError::Halted {
            rip: self.rip(),
            log: self.serial.recent(),
        }
    }

    /// There is no MMIO device: an MMIO exit means the guest touched an address with no
    /// usable RAM behind it. Inside RAM, that is a page KVM could not fault in (seen when a
    /// file-backed RAM mapping loses its pages, e.g. the file was truncated).
    fn on_mmio(&self, addr: u64) -> MachineError {
        if addr < self.mem.size() {
            MachineError::RamUnavailable {
                addr,
                rip: self.rip(),
            }
        } else {
            self.on_unexpected_exit(format!("MMIO access at {addr:#x}, beyond guest RAM"))
        }
    }

    fn on_unexpected_exit(&self, exit: String) -> MachineError {
        MachineError::UnexpectedExit {
            exit,
            rip: self.rip(),
            log: self.serial.recent(),
        }
    }

    fn rip(&self) -> u64 {
        self.kvm.vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX)
    }

    /// The vCPU stopped at an I/O exit whose instruction KVM completes only on the next
    /// KVM_RUN (api.rst, KVM_EXIT_IO / immediate_exit): with immediate_exit set, KVM_RUN
    /// completes it and returns EINTR without running the guest, so the registers are final.
    fn pause(&mut self) -> Result<(), MachineError> {
        self.kvm.vcpu.set_kvm_immediate_exit(1);
        let result = match self.kvm.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
            Ok(exit) => Err(io::Error::other(format!(
                "KVM_RUN returned {exit:?} instead of EINTR"
            ))),
        };
        self.kvm.vcpu.set_kvm_immediate_exit(0);
        result.map_err(MachineError::Pause)
    }

    /// Applies the guest writes since the last harvest to the I/O tracker.
    pub fn harvest_dirty_log(&mut self) -> Result<u64, MachineError> {
        self.last_harvest = Instant::now();
        if !self.tracking {
            return Ok(0);
        }
        let bitmap = KvmDirtyLog {
            vm: &self.kvm.vm,
            size: self.mem.size(),
            seen: &mut self.guest_written,
        }
        .harvest()
        .map_err(MachineError::DirtyLog)?;
        let tracker = self.block.tracker_mut().expect("tracking is on");
        Ok(tracker.apply_dirty_bitmap(&bitmap))
    }

    /// Whether KVM logs the guest's writes (the disk was opened with tracking).
    pub fn tracking(&self) -> bool {
        self.tracking
    }

    /// Every page written since the machine started, by the guest (KVM's dirty log, as of
    /// the last [`Self::harvest_dirty_log`]) or by this VMM (a disk read into guest RAM, a
    /// device's result, the session seed); the guest RAM's writes must be tracked from the
    /// start ([`GuestMemory::track_writes`]). None without dirty logging or write tracking.
    pub fn written_pages(&self) -> Option<WrittenPages> {
        let by_vmm = self.mem.written()?;
        if !self.tracking {
            return None;
        }
        let mut all = self.guest_written.clone();
        all.union(by_vmm);
        Some(WrittenPages {
            by_guest: self.guest_written.count(),
            by_vmm: by_vmm.count(),
            all,
        })
    }

    /// The VMM state of a paused machine (call after [`Self::run`] returned).
    pub fn save(&self) -> Result<VmState, MachineError> {
        let (overlay_offsets, overlay): (Vec<u64>, Vec<&[u8]>) =
            self.block.overlay().map(|(o, d)| (o.0, d)).unzip();
        let devices = DeviceState {
            mem_size: self.mem.size(),
            workload: self.guest.workload,
            seed: self.guest.seed,
            desktop: self.guest.desktop,
            disk_size: self.block.size(),
            disk_path: self.block.path().display().to_string(),
            overlay_offsets,
            requests_served: self.requests_served,
            io_tracking: self.block.tracker().map(|t| t.runs()).unwrap_or_default(),
        };
        let vcpu = self.kvm.save()?;
        let binding = binding::record(&self.mem, vcpu.regs.rsp);
        Ok(VmState {
            vcpu,
            devices,
            overlay: overlay.concat(),
            binding,
        })
    }
}
