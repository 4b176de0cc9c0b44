//! The few IndexedDB calls the store makes, as futures: a request's
//! result, a transaction's completion, opening and deleting a database.
//!
//! Each request gets one JavaScript function for both its `success` and
//! its `error` event (only one of them fires, and the function frees
//! itself after its one call). Its promise resolves in that event's
//! callback, so the Rust code awaiting it runs in the same microtask
//! checkpoint, while the transaction is still active: the next request
//! can be made on it. Nothing else may be awaited while a transaction is
//! open, or the browser commits it.

use js_sys::{Array, Function, Object, Promise, Reflect};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{IdbDatabase, IdbFactory, IdbOpenDbRequest, IdbRequest, IdbTransaction};

use newt_store::StoreError;

/// How a transaction commits (`durability` in IndexedDB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Flushed to disk before `complete` (`"strict"`).
    Strict,
    /// The browser's default: may be lost in a power cut (`"relaxed"`).
    Relaxed,
}

impl Durability {
    fn as_str(self) -> &'static str {
        match self {
            Durability::Strict => "strict",
            Durability::Relaxed => "relaxed",
        }
    }
}

/// A failed IndexedDB call as a [`StoreError::Backend`], with the DOM
/// exception's name and message when there is one.
pub(crate) fn js_error(context: &str, error: JsValue) -> StoreError {
    StoreError::Backend(format!("IndexedDB {context}: {}", describe(&error)).into())
}

/// The name and message of a DOM exception or JS error.
pub(crate) fn describe(error: &JsValue) -> String {
    let field =
        |name: &str| Reflect::get(error, &JsValue::from_str(name)).ok().and_then(|v| v.as_string());
    match (field("name"), field("message")) {
        (Some(name), Some(message)) => format!("{name}: {message}"),
        (Some(name), None) => name,
        _ => format!("{error:?}"),
    }
}

/// The name of a DOM exception (`"VersionError"`, ...), if `error` is one.
pub(crate) fn error_name(error: &JsValue) -> Option<String> {
    Reflect::get(error, &JsValue::from_str("name")).ok().and_then(|v| v.as_string())
}

/// The promise of a request's result. The handlers are attached at once,
/// so a request's promise can be made now and awaited after later
/// requests were made on the same transaction.
pub(crate) fn promise(request: &IdbRequest) -> Promise {
    let request = request.clone();
    Promise::new(&mut |resolve: Function, reject: Function| {
        let target = request.clone();
        let settle = Closure::once_into_js(move |_event: JsValue| {
            let outcome = match target.error() {
                Ok(Some(error)) => reject.call1(&JsValue::NULL, &error),
                Ok(None) => {
                    let result = target.result().unwrap_or(JsValue::UNDEFINED);
                    resolve.call1(&JsValue::NULL, &result)
                }
                Err(error) => reject.call1(&JsValue::NULL, &error),
            };
            // Calling resolve or reject does not throw.
            drop(outcome);
        });
        let settle: &Function = settle.unchecked_ref();
        request.set_onsuccess(Some(settle));
        request.set_onerror(Some(settle));
    })
}

/// Awaits a promise made by [`promise`].
pub(crate) async fn settle(context: &str, promise: Promise) -> Result<JsValue, StoreError> {
    JsFuture::from(promise).await.map_err(|e| js_error(context, e))
}

/// Makes a request with `make` and awaits its result.
pub(crate) async fn request(
    context: &str,
    make: impl FnOnce() -> Result<IdbRequest, JsValue>,
) -> Result<JsValue, StoreError> {
    let request = make().map_err(|e| js_error(context, e))?;
    settle(context, promise(&request)).await
}

/// Resolves when the transaction commits; an error if it aborts (with the
/// error that aborted it). Attach it before the transaction can finish.
pub(crate) fn completion(tx: &IdbTransaction) -> Promise {
    let tx = tx.clone();
    Promise::new(&mut |resolve: Function, reject: Function| {
        let target = tx.clone();
        let settle = Closure::once_into_js(move |event: web_sys::Event| {
            let outcome = if event.type_() == "complete" {
                resolve.call0(&JsValue::NULL)
            } else {
                let error = target.error().map_or(JsValue::from_str("aborted"), JsValue::from);
                reject.call1(&JsValue::NULL, &error)
            };
            drop(outcome);
        });
        let settle: &Function = settle.unchecked_ref();
        tx.set_oncomplete(Some(settle));
        tx.set_onabort(Some(settle));
    })
}

/// Opens a transaction over `stores`: `readwrite` with the given
/// durability, or `readonly` for `None`. `durability` is set through the
/// options object (web-sys has it only under `web_sys_unstable_apis`);
/// a browser that does not know the option ignores it.
pub(crate) fn transaction(
    db: &IdbDatabase,
    stores: &[&str],
    durability: Option<Durability>,
) -> Result<IdbTransaction, StoreError> {
    let names: Array = stores.iter().map(|s| JsValue::from_str(s)).collect();
    let mode = JsValue::from_str(if durability.is_some() { "readwrite" } else { "readonly" });
    let options = Object::new();
    if let Some(durability) = durability {
        Reflect::set(&options, &"durability".into(), &durability.as_str().into())
            .map_err(|e| js_error("transaction options", e))?;
    }
    let open: Function = Reflect::get(db, &"transaction".into())
        .and_then(|f| f.dyn_into::<Function>())
        .map_err(|e| js_error("transaction", e))?;
    open.call3(db, &names, &mode, &options)
        .and_then(|tx| tx.dyn_into::<IdbTransaction>())
        .map_err(|e| js_error("transaction", e))
}

/// The `durability` a transaction was opened with, as the browser reports
/// it (`"strict"`, `"relaxed"`, `"default"`; `None` if it has no such
/// attribute).
#[cfg(test)]
pub(crate) fn durability_of(tx: &IdbTransaction) -> Option<String> {
    Reflect::get(tx, &"durability".into()).ok().and_then(|v| v.as_string())
}

/// The `indexedDB` of the global scope (a window or a worker).
pub(crate) fn factory() -> Result<IdbFactory, StoreError> {
    Reflect::get(&js_sys::global(), &"indexedDB".into())
        .ok()
        .filter(|f| !f.is_undefined() && !f.is_null())
        .and_then(|f| f.dyn_into::<IdbFactory>().ok())
        .ok_or_else(|| StoreError::Backend("IndexedDB is not available here".into()))
}

/// Opens the database `name` at `version` (none: its current version, or
/// 1 for a new one), running `upgrade(db, transaction, old_version)` in
/// the `upgradeneeded` event. `upgrade` is synchronous: the version-change
/// transaction is only active during the event.
pub(crate) async fn open(
    name: &str,
    version: Option<u32>,
    upgrade: impl FnOnce(&IdbDatabase, &IdbTransaction, u32) -> Result<(), JsValue> + 'static,
) -> Result<IdbDatabase, JsValue> {
    let factory = factory().map_err(|e| JsValue::from_str(&e.to_string()))?;
    let request: IdbOpenDbRequest = match version {
        Some(v) => factory.open_with_u32(name, v)?,
        None => factory.open(name)?,
    };
    let target = request.clone();
    let on_upgrade = Closure::once_into_js(move |event: web_sys::IdbVersionChangeEvent| {
        let old = event.old_version() as u32;
        let outcome = target.result().and_then(|db| {
            let db: IdbDatabase = db.unchecked_into();
            let tx = target.transaction().ok_or_else(|| JsValue::from_str("no upgrade tx"))?;
            upgrade(&db, &tx, old).inspect_err(|_| tx.abort().unwrap_or_default())
        });
        drop(outcome);
    });
    request.set_onupgradeneeded(Some(on_upgrade.unchecked_ref()));
    let db = JsFuture::from(promise(&request)).await?;
    Ok(db.unchecked_into())
}

/// Deletes the database `name`. A connection still open elsewhere gets a
/// `versionchange` event (the store closes on it); the deletion waits for
/// it to close.
pub(crate) async fn delete(name: &str) -> Result<(), StoreError> {
    let factory = factory()?;
    request("delete", || factory.delete_database(name).map(|r| r.unchecked_into::<IdbRequest>()))
        .await?;
    Ok(())
}
