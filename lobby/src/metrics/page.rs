//! The status page: static files compiled into the binary, so that the
//! page works where nothing can be fetched from outside. Its script polls
//! `/api/stats` and draws the rates itself; the daemon only serves.

/// A file of the page.
#[derive(Debug)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

/// By path.
const ASSETS: [(&str, Asset); 3] = [
    (
        "/",
        Asset {
            content_type: "text/html; charset=utf-8",
            body: include_bytes!("page/index.html"),
        },
    ),
    (
        "/page.css",
        Asset {
            content_type: "text/css; charset=utf-8",
            body: include_bytes!("page/page.css"),
        },
    ),
    (
        "/page.js",
        Asset {
            content_type: "text/javascript; charset=utf-8",
            body: include_bytes!("page/page.js"),
        },
    ),
];

/// The page's own files and the API only: a browser that obeys it fetches
/// nothing from elsewhere, runs no inline script and frames nothing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The file served at `path`, if any.
pub fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS
        .iter()
        .find_map(|(at, asset)| (*at == path).then_some(asset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_names_is_served_and_nothing_outside() {
        let html = std::str::from_utf8(asset("/").unwrap().body).unwrap();
        for name in ["page.css", "page.js"] {
            assert!(html.contains(&format!("\"{name}\"")), "{name} not linked");
            assert!(asset(&format!("/{name}")).is_some(), "{name} not served");
        }
        for (path, asset) in &ASSETS {
            // The SVG namespace names an XML vocabulary; it is not fetched.
            let text = std::str::from_utf8(asset.body)
                .unwrap()
                .replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("://"), "{path} names an outside address");
        }
    }

    #[test]
    fn the_page_stays_light() {
        // Loaded once and kept open: a few tens of kilobytes, no framework.
        let weight: usize = ASSETS.iter().map(|(_, asset)| asset.body.len()).sum();
        assert!(weight < 32 * 1024, "{weight} bytes");
    }
}
