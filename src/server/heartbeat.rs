//! The shard's heartbeat task: proves to the service manager's watchdog that the shard's event
//! loop turns, and publishes where its inference worker's primary model is.
//!
//! Every [`Liveness::beat_interval`] the task, a timer on the shard's own executor, stores the
//! time in the shard's [`Liveness`] slot and the state of its model. It is the only writer of
//! that slot. A shard whose thread blocks (or spins, or died) stops beating, which is what the
//! watchdog needs to see: a task that ran elsewhere would go on beating for a stuck shard.

use std::rc::Rc;
use std::sync::Arc;

use super::Shard;
use crate::liveness::{Liveness, ModelState};

/// Beats until cancelled (the shard cancels it last, once it has drained).
pub async fn run(shard: Rc<Shard>, liveness: Arc<Liveness>) {
    let id = shard.id.0;
    loop {
        liveness.beat(id);
        liveness.set_model(id, model_state(&shard));
        glommio::timer::sleep(liveness.beat_interval()).await;
    }
}

/// The shard's primary model as its inference worker reports it.
fn model_state(shard: &Shard) -> ModelState {
    let Some(engine) = shard.router.engine() else {
        return ModelState::NotConfigured;
    };
    let Some(worker) = engine.worker() else {
        return ModelState::NotConfigured;
    };
    if worker.primary().is_some() {
        ModelState::Ready
    } else if worker.load_error().is_some() || !worker.is_running() {
        ModelState::Failed
    } else {
        ModelState::Loading
    }
}
