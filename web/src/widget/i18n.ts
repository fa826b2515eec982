// The widget's strings in English and Simplified Chinese.

const en = {
  open: "Chat with us",
  title: "Help",
  close: "Close chat",
  placeholder: "Type a message…",
  send: "Send",
  human: "Talk to a human",
  sending: "Sending…",
  sent: "Sent",
  read: "Read",
  typing: "{name} is typing…",
  agent: "Agent",
  bot: "Assistant",
  queued: "You are number {n} in the queue.",
  assigned: "{name} joined the chat.",
  closed: "The conversation has ended. Write again to start a new one.",
  offline: "Reconnecting…",
  nobody: "No one is online right now. Leave a message and we will reply here.",
  rateLimited: "Slow down a little; your message will be sent shortly.",
  welcome: "Hi! Ask us anything.",
  log: "Messages",
};

export type Strings = typeof en;

const zh: Strings = {
  open: "在线咨询",
  title: "帮助",
  close: "关闭对话",
  placeholder: "输入消息…",
  send: "发送",
  human: "转人工客服",
  sending: "发送中…",
  sent: "已发送",
  read: "已读",
  typing: "{name} 正在输入…",
  agent: "客服",
  bot: "智能助手",
  queued: "您正在排队，当前排第 {n} 位。",
  assigned: "{name} 已加入对话。",
  closed: "对话已结束。再次发送消息即可开始新的对话。",
  offline: "正在重新连接…",
  nobody: "目前没有客服在线。请留言，我们会在这里回复您。",
  rateLimited: "发送太快了，消息稍后会自动发出。",
  welcome: "您好！有什么可以帮您？",
  log: "消息",
};

/** Picks the strings from `data-lang` or the browser's language. */
export function strings(lang: string | null | undefined): { lang: string; t: Strings } {
  const wanted = (lang || navigator.language || "en").toLowerCase();
  return wanted.startsWith("zh") ? { lang: "zh-CN", t: zh } : { lang: "en", t: en };
}

export function fill(template: string, values: Record<string, string | number>): string {
  return template.replace(/\{(\w+)\}/g, (_, key: string) => String(values[key] ?? ""));
}
