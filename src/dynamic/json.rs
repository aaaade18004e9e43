//! Messages as JSON, by the protobuf JSON mapping (prost-reflect's): field names in lowerCamelCase
//! (the proto names are accepted too), enums by name or number, 64-bit integers as strings,
//! bytes as base64, fields at their default left out of answers. Unknown fields are an error that
//! names where it is.
//!
//! Knows message descriptors; nothing of calls or where the text comes from.

use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};

/// JSON that does not fit the message, with where.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// Not JSON at all.
    #[error("not JSON: {0}")]
    Syntax(serde_json::Error),
    /// JSON, but not a message of this type.
    #[error("JSON does not fit {message}{}: {error}", at(path))]
    Mismatch {
        /// The message type.
        message: String,
        /// Where (`profile.age`, `users[2].name`; `.` for the message itself).
        path: String,
        /// What is wrong there.
        error: String,
    },
    /// No message in the text.
    #[error("no JSON message given (expected an object like {{}})")]
    Empty,
}

fn at(path: &str) -> String {
    match path {
        "" | "." => String::new(),
        p => format!(" at {p}"),
    }
}

/// One message from JSON text.
pub fn message(desc: &MessageDescriptor, text: &str) -> Result<DynamicMessage, JsonError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(JsonError::Syntax)?;
    from_value(desc, value, "")
}

/// Messages from JSON text: one object, a JSON array of objects, or one object per line (or
/// several whitespace-separated objects), as a streaming call or a load of varied calls takes them.
pub fn messages(desc: &MessageDescriptor, text: &str) -> Result<Vec<DynamicMessage>, JsonError> {
    let values = serde_json::Deserializer::from_str(text)
        .into_iter::<serde_json::Value>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(JsonError::Syntax)?;
    let values = match <[serde_json::Value; 1]>::try_from(values) {
        Ok([serde_json::Value::Array(items)]) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("[{i}]"), v))
            .collect::<Vec<_>>(),
        Ok([one]) => vec![(String::new(), one)],
        Err(values) => values
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("(message {})", i + 1), v))
            .collect(),
    };
    if values.is_empty() {
        return Err(JsonError::Empty);
    }
    values
        .into_iter()
        .map(|(at, value)| from_value(desc, value, &at))
        .collect()
}

fn from_value(
    desc: &MessageDescriptor,
    value: serde_json::Value,
    at: &str,
) -> Result<DynamicMessage, JsonError> {
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(value, &mut track);
    DynamicMessage::deserialize_with_options(desc.clone(), deserializer, &DeserializeOptions::new())
        .map_err(|error| {
            let path = track.path().to_string();
            let path = match (at, path.as_str()) {
                ("", p) => p.to_owned(),
                (at, ".") => at.to_owned(),
                (at, p) => format!("{at}.{p}"),
            };
            JsonError::Mismatch {
                message: desc.full_name().to_owned(),
                path,
                error: error.to_string(),
            }
        })
}

/// A message as one line of JSON.
pub fn to_line(message: &DynamicMessage) -> String {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::new(&mut out);
    match message.serialize_with_options(&mut serializer, &SerializeOptions::new()) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        // Serializing into memory fails only on values JSON cannot hold (a NaN is written as
        // "NaN" by the mapping); say so rather than print half an object.
        Err(e) => format!("{{\"error\": {:?}}}", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: &str = r#"syntax = "proto3";
package edge.v1;
enum Color { COLOR_UNSPECIFIED = 0; RED = 1; GREEN = 2; }
message Inner { string label = 1; }
message Edge {
  int64 big = 1;
  uint64 ubig = 2;
  bytes blob = 3;
  Color color = 4;
  Inner inner = 5;
  repeated Inner items = 6;
  map<string, int32> counts = 7;
  int32 small = 8;
  bool flag = 9;
  string snake_name = 10;
}
"#;

    fn edge() -> MessageDescriptor {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("meshlb-json-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("edge.proto");
        std::fs::write(&file, EDGE).unwrap();
        let schema = crate::dynamic::Schema::from_proto(&[file], &[]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        schema.pool().get_message_by_name("edge.v1.Edge").unwrap()
    }

    fn round_trip(text: &str) -> String {
        to_line(&message(&edge(), text).unwrap())
    }

    #[test]
    fn the_mapping_holds_for_nested_enums_64_bit_bytes_and_maps() {
        let out = round_trip(
            r#"{"big": "-9007199254740993", "ubig": 18446744073709551615, "blob": "AAEC/w==",
                "color": "GREEN", "inner": {"label": "x"}, "items": [{"label": "a"}, {}],
                "counts": {"k": 3}, "snake_name": "proto name accepted"}"#,
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        // 64-bit integers go out as strings (a double would lose the last digit).
        assert_eq!(v["big"], "-9007199254740993");
        assert_eq!(v["ubig"], "18446744073709551615");
        assert_eq!(v["blob"], "AAEC/w==");
        assert_eq!(v["color"], "GREEN");
        assert_eq!(v["inner"]["label"], "x");
        assert_eq!(v["items"][0]["label"], "a");
        assert_eq!(v["items"][1], serde_json::json!({}));
        assert_eq!(v["counts"]["k"], 3);
        // Out in lowerCamelCase, as the mapping says.
        assert_eq!(v["snakeName"], "proto name accepted");
    }

    #[test]
    fn enums_by_number_and_defaults_left_out() {
        let out = round_trip(r#"{"color": 1, "small": 0, "flag": false, "big": "0"}"#);
        assert_eq!(out, r#"{"color":"RED"}"#);
        assert_eq!(round_trip("{}"), "{}");
    }

    #[test]
    fn misfits_name_their_field() {
        let e = message(&edge(), r#"{"inner": {"nope": 1}}"#).unwrap_err();
        assert!(e.to_string().contains("at inner"), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
        let e = messages(&edge(), r#"[{"items": [{}, {"label": 5}]}]"#).unwrap_err();
        assert!(e.to_string().contains("at [0].items[1].label"), "{e}");
        let e = message(&edge(), r#"{"color": "PURPLE"}"#).unwrap_err();
        assert!(e.to_string().contains("at color"), "{e}");
        let e = message(&edge(), r#"{"big": 1.5}"#).unwrap_err();
        assert!(e.to_string().contains("at big"), "{e}");
        assert!(matches!(message(&edge(), "{"), Err(JsonError::Syntax(_))));
    }

    #[test]
    fn several_messages_as_an_array_or_one_per_line() {
        let desc = edge();
        assert_eq!(
            messages(&desc, r#"[{"small": 1}, {"small": 2}]"#)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            messages(&desc, "{\"small\": 1}\n{\"small\": 2}\n{}\n")
                .unwrap()
                .len(),
            3
        );
        assert_eq!(messages(&desc, r#"{"small": 1}"#).unwrap().len(), 1);
        assert!(matches!(messages(&desc, "  \n"), Err(JsonError::Empty)));
        let e = messages(&desc, "{}\n{\"small\": \"x\"}").unwrap_err();
        assert!(e.to_string().contains("(message 2).small"), "{e}");
    }
}
