//! One agent per instance. Everything an instance sets up (pins, links,
//! routes, the virtual address, the broker session) is shared state: an
//! agent claims the instance, with a lock on `<run_dir>/<instance>.lock`,
//! before it touches any of it. A second agent for the same instance stops
//! there and leaves no trace; the kernel releases the lock when the holder
//! exits, crash included, so a successor is never locked out.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{Read as _, Seek as _, Write as _},
    path::PathBuf,
};

use anyhow::{Context as _, bail};

use crate::config::Config;

/// The claim on an instance, held for as long as this value lives.
pub struct Claim {
    _file: File,
}

impl Claim {
    /// Claims `config`'s instance, or fails naming the agent that holds it.
    pub fn take(config: &Config) -> anyhow::Result<Claim> {
        let path = lock_path(config);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the instance lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                };
                bail!(
                    "another pvc-agent{holder} runs instance {:?} (it holds {}): this one \
                     touched nothing and stops; stop the other first, or give this one another \
                     `instance`",
                    config.instance,
                    path.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        // For the message a second agent prints.
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(Claim { _file: file })
    }
}

pub fn lock_path(config: &Config) -> PathBuf {
    config.run_dir.join(format!("{}.lock", config.instance))
}
