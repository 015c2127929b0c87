//! Databases of their own for tests, on a shared server.

use std::time::Duration;

use crate::{LocalError, execute};

/// A database of its own on a shared server (a test's), dropped with this value, along with
/// whatever is still connected to it: a migrated database is ~10 MB, gigabytes over a whole
/// test run on one server.
#[derive(Debug)]
pub struct ScratchDatabase {
    url: String,
    /// The database's name and the server's `postgres` URL, until the database is kept.
    owned: Option<(String, String)>,
}

impl ScratchDatabase {
    /// Creates a database with a new name on the server whose `postgres` database (or another
    /// one to connect to) is at `admin_url`.
    pub async fn create(admin_url: &str) -> Result<Self, LocalError> {
        let (base, _) = admin_url.rsplit_once('/').ok_or(LocalError::Failed {
            what: "create database",
            detail: format!("{admin_url} has no database path"),
        })?;
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        execute(
            admin_url,
            "create database",
            &format!("CREATE DATABASE {name}"),
        )
        .await?;
        Ok(Self {
            url: format!("{base}/{name}"),
            owned: Some((name, admin_url.to_owned())),
        })
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL, the database no longer dropped.
    pub fn keep(mut self) -> String {
        self.owned = None;
        std::mem::take(&mut self.url)
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let Some((name, admin_url)) = self.owned.take() else {
            return;
        };
        let statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        // On a thread of its own: a drop inside a runtime cannot block on that runtime. A
        // server that does not answer leaves the database rather than hang the test.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    execute(&admin_url, "drop database", &statement),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(LocalError::Failed {
                        what: "drop database",
                        detail: "no answer in 30 s".into(),
                    })
                })
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test database {name} left: {e}"),
            Err(_) => eprintln!("test database {name} left: the drop panicked"),
        }
    }
}
