//! Helpers: fresh database names, real records, and a raw dump of a
//! database (every record of every object store, as IndexedDB holds it).

use std::cell::Cell;

use js_sys::{Array, Object, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{IdbDatabase, IdbRequest};

thread_local! {
    static COUNTER: Cell<u32> = const { Cell::new(0) };
}

/// A database name no earlier run used (the browser profile is fresh per
/// run, but the tests of one run share it).
pub(crate) fn fresh_name(prefix: &str) -> String {
    let n = COUNTER.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    format!("newt-test-{prefix}-{n}-{}", js_sys::Math::random())
}

pub(crate) use newt_store::conformance::fixtures::*;

async fn settle(request: IdbRequest) -> JsValue {
    let promise = js_sys::Promise::new(&mut |resolve, reject| {
        request.set_onsuccess(Some(&resolve));
        request.set_onerror(Some(&reject));
    });
    JsFuture::from(promise).await.unwrap();
    request.result().unwrap()
}

/// Opens `name` raw, at whatever version it has (a missing database is
/// created empty, version 1).
pub(crate) async fn raw_open(name: &str, version: Option<u32>) -> IdbDatabase {
    let factory: web_sys::IdbFactory =
        Reflect::get(&js_sys::global(), &"indexedDB".into()).unwrap().unchecked_into();
    let request = match version {
        Some(v) => factory.open_with_u32(name, v).unwrap(),
        None => factory.open(name).unwrap(),
    };
    settle(request.unchecked_into()).await.unchecked_into()
}

/// Every record of every object store of `name`, each as one byte string
/// (every property: bytes as they are, strings as UTF-8, numbers as
/// text), with the database version; sorted, so two dumps compare.
pub(crate) async fn dump(name: &str) -> (u32, Vec<(String, Vec<u8>)>) {
    let db = raw_open(name, None).await;
    let version = db.version() as u32;
    let names = db.object_store_names();
    let mut records = Vec::new();
    for i in 0..names.length() {
        let store_name = names.get(i).unwrap();
        let tx = db.transaction_with_str(&store_name).unwrap();
        let store = tx.object_store(&store_name).unwrap();
        let all: Array = settle(store.get_all().unwrap()).await.unchecked_into();
        for record in all.iter() {
            records.push((store_name.clone(), flatten(&record)));
        }
    }
    db.close();
    records.sort();
    (version, records)
}

fn flatten(value: &JsValue) -> Vec<u8> {
    if let Some(bytes) = value.dyn_ref::<Uint8Array>() {
        bytes.to_vec()
    } else if let Some(s) = value.as_string() {
        s.into_bytes()
    } else if let Some(n) = value.as_f64() {
        n.to_string().into_bytes()
    } else if let Some(array) = value.dyn_ref::<Array>() {
        array.iter().flat_map(|v| flatten(&v)).collect()
    } else if value.is_object() {
        let mut out = Vec::new();
        for entry in Object::entries(value.unchecked_ref()).iter() {
            let entry: Array = entry.unchecked_into();
            out.extend(flatten(&entry.get(0)));
            out.push(0);
            out.extend(flatten(&entry.get(1)));
            out.push(0);
        }
        out
    } else {
        format!("{value:?}").into_bytes()
    }
}

/// A copy of a record (records hold secrets and are not `Clone`).
pub(crate) fn copy<T: serde::Serialize + serde::de::DeserializeOwned>(record: &T) -> T {
    serde_json::from_value(serde_json::to_value(record).unwrap()).unwrap()
}
