//! Placeholder: the attendance handlers are built in a following change.

use serde::{Deserialize, Serialize};

use super::HandlersConfig;
use crate::handler::RegistryBuilder;

/// `[handlers.attendance]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttendanceConfig {}

impl AttendanceConfig {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

pub fn register(builder: RegistryBuilder, _config: &HandlersConfig) -> RegistryBuilder {
    builder
}
