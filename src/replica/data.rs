//! The user database a replica serves: loaded once from a JSON file, read-only afterwards.
//! It knows nothing of gRPC or HTTP; lookups return plain values and a `LookupError`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One user of the database, as stored in `replicas/users.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRecord {
    /// The user's name; the lookup key together with `age`.
    pub name: String,
    /// The user's age.
    pub age: i32,
    /// The user's points.
    pub points: i64,
}

/// Why the data file could not be loaded. The message names the file, and the line when the JSON
/// is malformed.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("cannot read data file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a JSON array of users.
    #[error("malformed data file {path}: line {line}, column {column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What serde_json says is wrong.
        message: String,
    },
}

/// Why a lookup has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The request itself is wrong (empty name, negative age).
    #[error("{0}")]
    Invalid(String),
    /// No user matches.
    #[error("{0}")]
    NotFound(String),
}

/// The read-only user database.
#[derive(Debug, Clone, Default)]
pub struct Users {
    records: Vec<UserRecord>,
}

impl Users {
    /// Loads the database from a JSON file: an array of `{name, age, points}`.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| DataError::Parse {
            path: path.to_owned(),
            line: e.line(),
            column: e.column(),
            message: strip_position(&e.to_string()),
        })
    }

    /// The database built into the binary (`replicas/users.json`: the talk's five users), used
    /// when no `--data` file is given.
    pub fn builtin() -> Self {
        Self::parse(include_str!("../../replicas/users.json"))
            .expect("the built-in data is checked by a unit test")
    }

    /// Parses the JSON text of a database.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        Ok(Self {
            records: serde_json::from_str(text)?,
        })
    }

    /// Builds a database from records, in this order.
    pub fn from_records(records: Vec<UserRecord>) -> Self {
        Self { records }
    }

    /// How many users there are.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The points of the user with exactly this name and age.
    pub fn points_of(&self, name: &str, age: i32) -> Result<i64, LookupError> {
        validate_profile(name, age)?;
        self.records
            .iter()
            .find(|u| u.name == name && u.age == age)
            .map(|u| u.points)
            .ok_or_else(|| {
                LookupError::NotFound(format!(
                    "no user named {:?} aged {age}",
                    crate::grpc::bounded(name, super::ECHO_LIMIT)
                ))
            })
    }

    /// Every user whose points equal `points`, in file order.
    pub fn with_points(&self, points: i64) -> impl Iterator<Item = &UserRecord> {
        self.records.iter().filter(move |u| u.points == points)
    }
}

/// Checks a lookup key: a non-empty name and a non-negative age.
pub fn validate_profile(name: &str, age: i32) -> Result<(), LookupError> {
    if name.is_empty() {
        return Err(LookupError::Invalid(
            "profile.name must not be empty".into(),
        ));
    }
    if age < 0 {
        return Err(LookupError::Invalid(format!(
            "profile.age must not be negative, got {age}"
        )));
    }
    Ok(())
}

/// serde_json appends " at line L column C"; the error already says where, once.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn talk_users() -> Users {
        Users::builtin()
    }

    #[test]
    fn finds_points_by_exact_name_and_age() {
        let users = talk_users();
        assert_eq!(users.len(), 5);
        assert_eq!(users.points_of("james", 26), Ok(1000));
        assert_eq!(users.points_of("jake", 27), Ok(800));
        assert!(matches!(
            users.points_of("james", 27),
            Err(LookupError::NotFound(_))
        ));
    }

    #[test]
    fn rejects_empty_name_and_negative_age() {
        let users = talk_users();
        assert!(matches!(
            users.points_of("", 3),
            Err(LookupError::Invalid(_))
        ));
        assert!(matches!(
            users.points_of("amy", -1),
            Err(LookupError::Invalid(_))
        ));
    }

    #[test]
    fn lists_users_with_points_in_file_order() {
        let users = talk_users();
        let names: Vec<_> = users.with_points(1000).map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["james", "amy", "robert"]);
        assert_eq!(users.with_points(5).count(), 0);
    }

    #[test]
    fn malformed_file_names_file_and_line() {
        let dir = std::env::temp_dir().join(format!("meshlb-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.json");
        std::fs::write(
            &path,
            "[\n {\"name\": \"a\", \"age\": 1, \"points\": 2},\n {\"name\": }\n]",
        )
        .unwrap();
        let err = Users::load(&path).unwrap_err().to_string();
        assert!(err.contains("bad.json"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        let missing = Users::load(&dir.join("nope.json")).unwrap_err().to_string();
        assert!(missing.contains("nope.json"), "{missing}");
    }
}
