//! Fuzzes the command grammar: never panics, and every accepted command's
//! canonical form parses back to the same command.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_bot::command::parse;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    match parse(line) {
        Ok(command) => {
            let canonical = command.to_string();
            assert_eq!(parse(&canonical).as_ref(), Ok(&command), "canonical form {canonical:?} of {line:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
