//! VERSION: which CNI versions the plugin speaks. Needs nothing but `CNI_COMMAND`.

use serde_json::Value;

use crate::config::{self, CniVersion};
use crate::result;

/// Answers in the configuration's version when stdin names a supported one, in the
/// latest otherwise.
pub fn run(stdin: &[u8]) -> Value {
    result::version_result(config::version_hint(stdin).unwrap_or(CniVersion::LATEST))
}
