package events

import (
	"slices"
	"testing"
)

func TestCursorRoundTrip(t *testing.T) {
	for _, c := range []Cursor{
		{},
		{{ConfigStream, 0}},
		{{ConfigStream, 7}, {0, 1}, {5, 1 << 40}, {4095, 3}},
		{{1<<31 - 1, 1<<63 - 1}},
	} {
		got, err := ParseCursor(c.String())
		if err != nil || !slices.Equal(got, c) && len(c) > 0 {
			t.Fatalf("round trip of %v = %v, %v", c, got, err)
		}
		if tick, ok := c.Tick(ConfigStream); ok != (len(c) > 0 && c[0].Stream == ConfigStream) || ok && tick != c[0].Tick {
			t.Fatalf("Tick(config) of %v = %d, %v", c, tick, ok)
		}
	}
	for _, bad := range []string{"", "!", "AA", "Ag", "AQE", "AQAB"} {
		if _, err := ParseCursor(bad); err == nil {
			t.Errorf("ParseCursor(%q) accepted", bad)
		}
	}
}

// Any input either fails to parse or parses to a cursor whose encoding
// parses back to the same cursor with streams strictly ascending.
func FuzzParseCursor(f *testing.F) {
	f.Add(Cursor{{ConfigStream, 3}, {0, 1}, {17, 99}}.String())
	f.Add("AQ")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseCursor(s)
		if err != nil {
			return
		}
		for i := 1; i < len(c); i++ {
			if c[i].Stream <= c[i-1].Stream {
				t.Fatalf("streams not ascending: %v", c)
			}
		}
		if len(c) > 0 && c[0].Stream < ConfigStream {
			t.Fatalf("stream below config: %v", c)
		}
		again, err := ParseCursor(c.String())
		if err != nil || !slices.Equal(again, c) {
			t.Fatalf("re-encoding %v gives %v, %v", c, again, err)
		}
	})
}
