//! A private PostgreSQL server for tests that stop and start their database: `initdb` and
//! `pg_ctl` from `/usr/lib/postgresql/*/bin` in a temporary directory, on a free port, as the
//! `postgres` user when the tests run as root (initdb refuses root). Never the machine's shared
//! server.

use std::path::PathBuf;
use std::process::Command;

use super::free_port;

pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A private PostgreSQL server in a temporary directory, on its own port, stopped and removed
/// when dropped. Never the machine's shared server.
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    running: bool,
    // Last, so the directory outlives the server.
    dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// Creates and starts one, or says why it cannot.
    pub fn start() -> Result<Self, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("no /usr/lib/postgresql: {e}"))?
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
            .max()
            .ok_or("no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        if is_root() {
            // initdb refuses root: the server runs as the postgres user, in a directory it owns.
            let chown = Command::new("chown")
                .args(["postgres:"])
                .arg(dir.path())
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !chown.success() {
                return Err("cannot chown the data directory to the postgres user".into());
            }
        }
        let data = dir.path().join("data");
        let mut pg = PrivatePostgres {
            bin,
            data,
            port: free_port(),
            running: false,
            dir,
        };
        let data = pg.data.display().to_string();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-N",
                "-E",
                "UTF8",
            ],
        )?;
        pg.start_again()?;
        Ok(pg)
    }

    /// `bin/program args…`, as the postgres user when we are root.
    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let program = self.bin.join(program);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = command
            .args(args)
            .output()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} {args:?}: {}{}",
                program.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    pub fn start_again(&mut self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let data = self.data.display().to_string();
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-o", &options, "-l", &log, "-w", "-t", "30", "start",
            ],
        )?;
        self.running = true;
        Ok(())
    }

    /// `pg_ctl stop -m immediate`: every backend is killed at once, like a crash.
    pub fn stop(&mut self) -> Result<(), String> {
        let data = self.data.display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])?;
        self.running = false;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop();
        }
    }
}
