//! The one SQL surface both stores answer: statements with `?N` placeholders, values bound and
//! read as [`Value`]s. Everything the store does (lookups, claims, records, rollouts, the audit
//! queries) is written once against [`Db`]; [`super::sqlite`] and [`super::postgres`] only run it.

use super::AuditError;

/// Which store answers; for the few statements that differ (catalog queries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A value bound to a statement or read from a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// PostgreSQL's clock in milliseconds since the epoch, as [`Db::now_ms`] reads it.
pub(super) const POSTGRES_NOW_MS: &str =
    "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

/// A connection or an open transaction of either store.
pub trait Db {
    fn dialect(&self) -> Dialect;
    /// Runs a statement; returns the rows it changed.
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, AuditError>;
    /// Runs a query; returns every row.
    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, AuditError>;

    fn query_opt(&mut self, sql: &str, args: &[Value]) -> Result<Option<Row>, AuditError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    fn query_one(&mut self, sql: &str, args: &[Value]) -> Result<Row, AuditError> {
        self.query_opt(sql, args)?
            .ok_or_else(|| AuditError::Store("a query that returns one row returned none".into()))
    }

    /// The store's clock, in milliseconds since the epoch: leases are compared by one clock,
    /// the database server's, whichever host a worker runs on. In a PostgreSQL write
    /// transaction it is the clock read once the transaction held its lock, for all its writes.
    fn now_ms(&mut self) -> Result<i64, AuditError> {
        match self.dialect() {
            Dialect::Sqlite => Ok(chrono::Utc::now().timestamp_millis()),
            Dialect::Postgres => self.query_one(POSTGRES_NOW_MS, &[])?.get(0),
        }
    }
}

/// One row of a result.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// Column `index` as `T`; a type that does not fit is an error naming the column.
    pub fn get<T: FromValue>(&self, index: usize) -> Result<T, AuditError> {
        let value = self.0.get(index).unwrap_or(&Value::Null);
        T::from_value(value).ok_or_else(|| {
            AuditError::Store(format!(
                "column {index} holds {value:?}, not the expected type"
            ))
        })
    }
}

/// A Rust value that binds as a [`Value`].
pub trait Arg {
    fn arg(&self) -> Value;
}

/// `args![a, b]`: the values of a statement's placeholders, in order.
#[macro_export]
#[doc(hidden)]
macro_rules! args {
    ($($value:expr),* $(,)?) => {
        &[$($crate::audit::db::Arg::arg(&$value)),*] as &[$crate::audit::db::Value]
    };
}
pub use crate::args;

impl<T: Arg + ?Sized> Arg for &T {
    fn arg(&self) -> Value {
        (**self).arg()
    }
}

impl Arg for str {
    fn arg(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl Arg for String {
    fn arg(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl Arg for [u8] {
    fn arg(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl Arg for Vec<u8> {
    fn arg(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl Arg for bool {
    fn arg(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}

impl Arg for f64 {
    fn arg(&self) -> Value {
        Value::Real(*self)
    }
}

macro_rules! int_arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn arg(&self) -> Value {
                Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
            }
        }
    )*};
}
int_arg!(i64, i32, u16, u32, u64, usize);

impl<T: Arg> Arg for Option<T> {
    fn arg(&self) -> Value {
        self.as_ref().map_or(Value::Null, Arg::arg)
    }
}

impl Arg for Value {
    fn arg(&self) -> Value {
        self.clone()
    }
}

/// A Rust value read from a [`Value`].
pub trait FromValue: Sized {
    fn from_value(value: &Value) -> Option<Self>;
}

impl FromValue for String {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Text(text) => Some(text.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Blob(bytes) => Some(bytes.clone()),
            Value::Text(text) => Some(text.as_bytes().to_vec()),
            _ => None,
        }
    }
}

impl FromValue for bool {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(n) => Some(*n != 0),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Real(x) => Some(*x),
            Value::Int(n) => Some(*n as f64),
            _ => None,
        }
    }
}

macro_rules! int_from {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(value: &Value) -> Option<Self> {
                match value {
                    Value::Int(n) => <$t>::try_from(*n).ok(),
                    _ => None,
                }
            }
        }
    )*};
}
int_from!(i64, i32, u16, u32, u64);

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// `?N` placeholders as PostgreSQL writes them (`$N`). A `?` not followed by a digit is left
/// alone, and the statements have no `?` inside string literals.
pub fn numbered_dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_and_nothing_else_changes() {
        assert_eq!(
            numbered_dollars("SELECT a FROM t WHERE a = ?1 AND b = ?12 OR c = '?'"),
            "SELECT a FROM t WHERE a = $1 AND b = $12 OR c = '?'"
        );
    }

    #[test]
    fn a_value_of_another_type_is_an_error_not_a_default() {
        let row = Row(vec![Value::Text("x".into()), Value::Null, Value::Int(-1)]);
        assert_eq!(row.get::<String>(0).unwrap(), "x");
        assert_eq!(row.get::<Option<String>>(1).unwrap(), None);
        assert!(row.get::<String>(1).is_err());
        assert!(row.get::<u32>(2).is_err(), "a negative count is not a u32");
        assert_eq!(row.get::<i64>(2).unwrap(), -1);
    }
}
