// The widget's CSS, scoped by its shadow root. `all: initial` on the root stops
// inherited host styles (huge fonts, colours); only px units, never rem.

export const STYLE = `
.sb{all:initial;font:14px/1.4 system-ui,-apple-system,"Segoe UI","PingFang SC","Microsoft YaHei",sans-serif;color:#1c2430;}
.sb *{box-sizing:border-box;font:inherit;color:inherit;}
.fab{position:fixed;right:20px;bottom:20px;width:56px;height:56px;border-radius:50%;border:0;background:#1558d6;color:#fff;
 display:flex;align-items:center;justify-content:center;cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25);padding:0;margin:0}
.fab:focus-visible,.sb button:focus-visible,.sb textarea:focus-visible,.log:focus-visible{outline:3px solid #f5a623;outline-offset:2px}
.panel{position:fixed;right:20px;bottom:88px;width:360px;max-width:calc(100vw - 16px);height:520px;max-height:calc(100vh - 104px);
 background:#fff;border-radius:12px;box-shadow:0 8px 30px rgba(0,0,0,.3);display:flex;flex-direction:column;overflow:hidden}
.panel[hidden]{display:none}
.head{display:flex;align-items:center;justify-content:space-between;padding:12px 14px;background:#1558d6;color:#fff;font-weight:600;font-size:16px}
.x{background:none;border:0;color:#fff;font-size:24px;line-height:1;cursor:pointer;padding:0 4px}
.status{padding:0 14px;font-size:13px}
.status.info,.status.warn{padding:8px 14px;background:#eef4ff}
.status.warn{background:#fff4e0}
.log{flex:1;overflow-y:auto;padding:12px;display:flex;flex-direction:column;gap:8px;background:#f6f7f9}
.m{max-width:82%;display:flex;flex-direction:column}
.m .b{padding:8px 11px;border-radius:12px;background:#fff;border:1px solid #e1e4e8;white-space:pre-wrap;word-wrap:break-word}
.m.me{align-self:flex-end;align-items:flex-end}
.m.me .b{background:#1558d6;color:#fff;border-color:#1558d6}
.m.bot .b{background:#eef7ee;border-color:#cfe6cf}
.m.sys{align-self:center;max-width:95%;font-size:12px;color:#5b6470;text-align:center}
.who{font-size:11px;color:#5b6470;margin:0 0 2px 4px}
.st{font-size:11px;color:#5b6470;margin-top:2px}
.m.me[data-state=read] .st{color:#1a7f37}
.typing{padding:2px 14px;font-size:12px;color:#5b6470;font-style:italic}
.typing[hidden]{display:none}
.human{margin:6px 12px 0;padding:6px 10px;border:1px solid #1558d6;border-radius:16px;background:#fff;color:#1558d6;cursor:pointer;align-self:flex-start;font-size:13px}
.compose{display:flex;gap:8px;padding:10px 12px;border-top:1px solid #e1e4e8;margin:0}
.compose textarea{flex:1;resize:none;border:1px solid #c8cdd3;border-radius:8px;padding:8px;min-height:38px;max-height:120px;background:#fff;display:block}
.send{border:0;border-radius:8px;background:#1558d6;color:#fff;padding:0 14px;cursor:pointer;font-weight:600}
@media (max-width:480px){
 .panel{right:0;bottom:0;width:100vw;max-width:100vw;height:100%;max-height:100%;border-radius:0}
 .open .fab{display:none}
}
`;
