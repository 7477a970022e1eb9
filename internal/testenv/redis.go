package testenv

import (
	"context"
	"testing"
	"time"

	"github.com/redis/rueidis"
)

func deleteRedisPrefix(t testing.TB, addr, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Errorf("testenv: clean Redis prefix %s: %v", prefix, err)
		return
	}
	defer c.Close()
	var cursor uint64
	for {
		e, err := c.Do(ctx, c.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
		if err != nil {
			t.Errorf("testenv: scan Redis prefix %s: %v", prefix, err)
			return
		}
		if len(e.Elements) > 0 {
			if err := c.Do(ctx, c.B().Unlink().Key(e.Elements...).Build()).Error(); err != nil {
				t.Errorf("testenv: unlink Redis keys: %v", err)
				return
			}
		}
		if e.Cursor == 0 {
			return
		}
		cursor = e.Cursor
	}
}
