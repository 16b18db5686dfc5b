//! Fuzzes `tokens.json` parsing: never panics; an accepted registry writes
//! back to JSON that parses to the same registry, and every hooks URL passes
//! the SSRF rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_protocol::Registry;
use mesh_protocol::registry::check_hooks_url;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(registry) = Registry::parse(text) {
        let back = Registry::parse(&registry.to_json()).expect("a written registry parses");
        assert_eq!(back, registry);
        for agent in registry.agents() {
            check_hooks_url(agent.hooks_url.as_str()).expect("accepted hooks_url passes the rules");
            let _ = agent.gateway_base();
        }
    }
});
