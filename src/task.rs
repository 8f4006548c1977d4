//! The contract of a long-running task: it runs until the stop signal it
//! was given (a cancellation token) and returns `Ok(())` then; returning
//! earlier, or with an error, is a failure the supervisor of `serve`
//! ([`crate::app::Supervisor`]) reports by the task's name.
//!
//! The error type lives here, below every module that runs such a task
//! (caches, watches, the Lease, the writers), so none of them imports
//! [`crate::app`], which wires them: the arrows point from `app` down.

/// The error a long-running task may end with.
pub type TaskError = Box<dyn std::error::Error + Send + Sync>;
