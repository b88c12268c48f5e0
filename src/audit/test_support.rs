//! For tests (this crate's and its integration tests'; not part of keyturn's interface): a
//! PostgreSQL database of a test's own, made on the server the tests use and dropped after.
//!
//! The server is `KEYTURN_TEST_POSTGRES_URL` (a URL to a database the user may create databases
//! from), else the local one at `postgres://postgres@127.0.0.1:5432/postgres`. With neither, the
//! test fails and says how to get one: it never skips.

use std::sync::atomic::{AtomicU32, Ordering};

use postgres::{Client, NoTls};

/// The admin URL the tests create their databases from.
pub fn server_url() -> String {
    std::env::var("KEYTURN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, empty database; dropped (with its connections) when this is dropped.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

/// Runs `work` on a thread of its own: the blocking client cannot run inside an async runtime,
/// and tests often are one.
fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(work)
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn admin() -> Client {
    let url = server_url();
    Client::connect(&url, NoTls).unwrap_or_else(|error| {
        // The URL may hold a password: only its host and database are shown.
        let server = crate::audit::Location::Postgres(url).describe();
        panic!(
            "the PostgreSQL tests need a server: none at {server} ({error}). Start the local one \
             (`pg_ctlcluster 15 main start`, or `service postgresql start`) or set \
             KEYTURN_TEST_POSTGRES_URL to a URL whose user may create databases"
        )
    })
}

impl TestDatabase {
    /// Creates a database named after the test process and a counter.
    pub fn create(label: &str) -> TestDatabase {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let label: String = label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect::<String>()
            .to_ascii_lowercase();
        let name = format!(
            "keyturn_test_{label}_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u16>()
        );
        let created = name.clone();
        off_runtime(move || {
            admin()
                .batch_execute(&format!("CREATE DATABASE {created}"))
                .unwrap_or_else(|error| panic!("creating the test database {created}: {error}"));
        });
        TestDatabase {
            url: url_with_database(&server_url(), &name),
            name,
        }
    }

    /// Runs `work` with a connection of its own to this database, off any async runtime.
    pub fn with_client<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Client) -> T + Send + 'static,
    ) -> T {
        let url = self.url.clone();
        off_runtime(move || {
            let mut client = Client::connect(&url, NoTls).expect("connect to the test database");
            work(&mut client)
        })
    }
}

/// `url` naming database `name` instead of its own.
fn url_with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |at| at + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |at| scheme_end + at);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        off_runtime(move || {
            if let Err(error) =
                admin().batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            {
                eprintln!("dropping the test database {name}: {error}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::url_with_database;

    #[test]
    fn the_database_is_swapped_and_the_rest_kept() {
        assert_eq!(
            url_with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "t1"),
            "postgres://u:p@h:5432/t1?sslmode=disable"
        );
        assert_eq!(url_with_database("postgres://h", "t2"), "postgres://h/t2");
    }
}
