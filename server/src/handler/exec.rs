//! The `exec` handler (STUB — filled in by the handlers work).
use super::{Args, Handler, HandlerError, WorkCtx};
#[derive(Debug, Clone, Default)]
pub struct ExecConfig {}
pub struct Exec;
impl Exec {
    pub fn new(_c: ExecConfig) -> Self {
        Exec
    }
}
impl Handler for Exec {
    fn name(&self) -> &str {
        "exec"
    }
    fn validate(&self, _a: &Args, _p: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
    fn run(&self, _c: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        Ok(Vec::new())
    }
}
