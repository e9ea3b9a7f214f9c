//! The `ckptfs` subcommands for checkpoints on an object store: push, pull,
//! and inspect / verify of an `s3://` location.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use ckptfs::remote::{
    self, PullOptions, PushOptions, RemoteCheckpoint, RemoteOptions, S3Url, Store,
};
use ckptfs::{MemoryImage, PageReader};

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn push(
    ckpt: &Path,
    url: &str,
    loading_set: Option<PathBuf>,
    no_loading_set: bool,
    json: bool,
) -> Result<ExitCode> {
    let url = S3Url::parse(url)?;
    let store = Store::from_env(&url)?;
    let opts = PushOptions {
        loading_set,
        no_loading_set,
        progress: std::io::stderr().is_terminal() && !json,
    };
    let s = remote::push(ckpt, &store, &opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "pushed {} to {} in {:.2}s",
        ckpt.display(),
        s.url,
        s.seconds
    );
    println!(
        "  uploaded    {:>10.1} MiB  {:>6} packs",
        mib(s.bytes_uploaded),
        s.packs_uploaded
    );
    println!(
        "  skipped     {:>10.1} MiB  {:>6} packs (already in the store)",
        mib(s.bytes_skipped),
        s.packs_skipped
    );
    println!(
        "  manifest    {:>10.1} MiB  ({} pages, {} stored)",
        mib(s.manifest_bytes),
        s.pages,
        s.stored_pages
    );
    match (s.loading_set_pages, &s.loading_set_warning) {
        (Some(p), _) => println!(
            "  loading set {p:>10} pages in the first {} packs",
            s.loading_set_packs
        ),
        (None, Some(w)) => println!("  loading set NOT pushed: {w}"),
        (None, None) => println!("  loading set none"),
    }
    if s.flattened {
        println!("  (its parents' pages were pushed with it: the pushed checkpoint stands alone)");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pull(url: &str, out: &Path, disk: Vec<PathBuf>, json: bool) -> Result<ExitCode> {
    let url = S3Url::parse(url)?;
    let store = Store::from_env(&url)?;
    let opts = PullOptions {
        disk_override: (!disk.is_empty()).then_some(disk),
        no_loading_set: false,
        progress: std::io::stderr().is_terminal() && !json,
    };
    let s = remote::pull(&store, out, &opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "pulled {} into {} in {:.2}s: {:.1} MiB in {} packs, checkpoint {:.1} MiB (hash matches the pushed file)",
        s.url,
        s.path,
        s.seconds,
        mib(s.bytes_downloaded),
        s.packs,
        mib(s.file_bytes)
    );
    match (&s.loading_set, &s.loading_set_warning) {
        (Some(p), _) => println!("  loading set {p}"),
        (None, Some(w)) => println!("  loading set NOT written: {w}"),
        (None, None) => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn open(
    url: &S3Url,
    disk: Vec<PathBuf>,
    cache_dir: Option<PathBuf>,
    allow_missing: bool,
) -> Result<RemoteCheckpoint> {
    let mut opts = RemoteOptions {
        disk_override: (!disk.is_empty()).then_some(disk),
        allow_missing,
        ..RemoteOptions::default()
    };
    if let Some(d) = cache_dir {
        opts.cache_dir = d;
    }
    Ok(RemoteCheckpoint::open(url, &opts)?)
}

pub fn inspect(url: &S3Url, disk: Vec<PathBuf>, json: bool) -> Result<ExitCode> {
    let rc = open(url, disk, None, true)?;
    let i = remote::verify::inspect(&rc);
    if json {
        println!("{}", serde_json::to_string_pretty(&i)?);
    } else {
        println!(
            "{url}: ckptfs checkpoint on an object store ({})",
            i.manifest
        );
        println!(
            "  guest RAM   {:>10.1} MiB  {:>9} pages",
            mib(i.guest_bytes),
            i.pages
        );
        for (kind, n) in [
            ("ZERO", i.zero_pages),
            ("DISK", i.disk_pages),
            ("BLOB", i.blob_pages),
        ] {
            println!("  {kind:<10}  {n:>10} pages");
        }
        println!(
            "  stored      {:>10} pages in {} packs ({:.1} MiB)",
            i.blobs_stored,
            i.packs,
            mib(i.pack_bytes)
        );
        if let Some(p) = i.loading_set_pages {
            println!(
                "  loading set {p:>10} pages, first {} packs",
                i.loading_set_packs
            );
        }
        println!("  VMM state   {:>10} bytes", i.vmm_state_bytes);
        for (n, (path, why)) in i.disks.iter().enumerate() {
            let why = why
                .as_ref()
                .map(|w| format!(" UNUSABLE: {w}"))
                .unwrap_or_default();
            println!("  disk {n}: {path}{why}");
        }
    }
    Ok(if i.disks.iter().all(|d| d.1.is_none()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn verify(
    url: &S3Url,
    disk: Vec<PathBuf>,
    cache_dir: Option<PathBuf>,
    mem: Option<&Path>,
    json: bool,
) -> Result<ExitCode> {
    let rc = open(url, disk, cache_dir, false)?;
    let dump = mem.map(MemoryImage::open).transpose()?;
    let bar = if std::io::stderr().is_terminal() && !json {
        indicatif::ProgressBar::new(rc.page_count())
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = remote::verify::verify(&rc, dump.as_ref().map(MemoryImage::bytes), |d| {
        bar.set_position(d)
    });
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::commands::print_report(Path::new(&url.to_string()), &report);
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
