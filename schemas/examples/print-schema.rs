//! Prints the JSON Schema of keel.yaml, generated from the types: how `schemas/keel.schema.json` is
//! regenerated (`cargo run -p keel-schemas --example print-schema > schemas/keel.schema.json`). The proxy
//! ships the committed file rather than the generator, which would cost every proxy idle memory.

#![allow(clippy::print_stdout)]

fn main() {
    print!("{}", keel_schemas::json_schema_text());
}
