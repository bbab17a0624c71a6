//! The portal's two languages (English and Simplified Chinese, the seed's language) and every
//! text its pages show. Each text is one line with both translations, so a text missing in one
//! language cannot compile. The language comes from the `aihub_lang` cookie (set by the switch
//! in the header), else the browser's `Accept-Language`, else English.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    En,
    Zh,
}

impl Lang {
    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Zh => "zh",
        }
    }

    pub fn parse(code: &str) -> Option<Lang> {
        match code {
            "en" => Some(Lang::En),
            "zh" => Some(Lang::Zh),
            _ => None,
        }
    }

    /// The cookie's choice, else the first of the browser's languages we speak.
    pub fn pick(cookie: Option<&str>, accept_language: Option<&str>) -> Lang {
        if let Some(l) = cookie.and_then(Lang::parse) {
            return l;
        }
        for tag in accept_language.unwrap_or("").split(',') {
            let tag = tag
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if tag.starts_with("zh") {
                return Lang::Zh;
            }
            if tag.starts_with("en") {
                return Lang::En;
            }
        }
        Lang::En
    }

    pub fn texts(self) -> &'static Texts {
        match self {
            Lang::En => &EN,
            Lang::Zh => &ZH,
        }
    }
}

macro_rules! texts {
    ($($key:ident: $en:literal, $zh:literal;)*) => {
        /// Every text of the portal in one language.
        pub struct Texts { $(pub $key: &'static str,)* }
        pub static EN: Texts = Texts { $($key: $en,)* };
        pub static ZH: Texts = Texts { $($key: $zh,)* };
    };
}

texts! {
    brand: "AI Hub", "AI Hub";
    nav_dashboard: "Dashboard", "概览";
    nav_keys: "API keys", "API 密钥";
    nav_webhooks: "Webhooks", "Webhooks";
    nav_usage: "Usage", "用量";
    nav_tasks: "Tasks", "任务";
    nav_billing: "Billing", "账单";
    nav_docs: "Docs", "文档";
    nav_admin: "Operators", "运营管理";
    nav_account: "Account", "账户";
    log_in: "Log in", "登录";
    log_out: "Log out", "退出";
    register: "Create account", "注册账户";
    language: "Language", "语言";
    footer_terms: "Terms of service", "服务条款";
    footer_refunds: "Refund policy", "退款政策";
    footer_api: "API reference", "API 参考";

    email: "Email", "邮箱";
    password: "Password", "密码";
    password_hint: "10 to 128 characters; not a common password.", "10 到 128 个字符，不能是常见密码。";
    full_name: "Full name", "姓名";
    company: "Company (optional)", "公司（可选）";
    developer_type: "Account type", "账户类型";
    type_individual: "Individual", "个人";
    type_enterprise: "Enterprise", "企业";
    login_title: "Log in to AI Hub", "登录 AI Hub";
    login_no_account: "No account yet?", "还没有账户？";
    login_forgot: "Forgot your password?", "忘记密码？";
    login_failed: "Incorrect email or password.", "邮箱或密码错误。";
    register_title: "Create your developer account", "创建开发者账户";
    register_have_account: "Already registered?", "已有账户？";
    register_done: "Check your inbox: we sent a link to verify your email address.", "请查收邮件：我们已发送邮箱验证链接。";
    verify_title: "Verify your email", "验证邮箱";
    verify_intro: "Confirm your email address to start creating API keys.", "确认邮箱地址后即可创建 API 密钥。";
    verify_token: "Verification token (from the mail)", "验证令牌（见邮件）";
    verify_button: "Verify my email", "验证邮箱";
    verify_done: "Email verified. You can now log in and create API keys.", "邮箱已验证，现在可以登录并创建 API 密钥。";
    verify_resend: "Send a new link", "重新发送验证链接";
    verify_pending: "Your email address is not verified yet: verify it to create API keys.", "您的邮箱尚未验证：验证后才能创建 API 密钥。";
    resend_done: "If the address has an unverified account, a new link is on its way.", "如果该邮箱有未验证的账户，新的链接已发出。";
    reset_title: "Reset your password", "重置密码";
    reset_intro: "We will mail you a token to choose a new password.", "我们将通过邮件发送令牌，用于设置新密码。";
    reset_button: "Send reset mail", "发送重置邮件";
    reset_sent: "If the address has an account, a reset mail is on its way.", "如果该邮箱有账户，重置邮件已发出。";
    reset_confirm_title: "Choose a new password", "设置新密码";
    reset_token: "Reset token (from the mail)", "重置令牌（见邮件）";
    new_password: "New password", "新密码";
    current_password: "Current password", "当前密码";
    reset_confirm_button: "Set the new password", "设置新密码";
    reset_done: "Password changed. Log in with the new password.", "密码已修改，请使用新密码登录。";
    logged_out: "You are logged out.", "您已退出登录。";
    account_spend_cap: "Monthly overage spend cap, USD (optional)", "每月超额消费上限（美元，可选）";
    account_spend_cap_hint: "Once this month's overage reaches it, requests are refused until the month ends. Empty: no cap.", "本月超额费用达到上限后，请求将被拒绝直至月底。留空：不设上限。";
    account_password: "Change password", "修改密码";
    account_password_hint: "Every session ends: you log in again.", "所有会话都将结束，需要重新登录。";

    dash_title: "Dashboard", "概览";
    dash_period: "This period", "本期";
    dash_requests: "Requests", "请求数";
    dash_tokens: "Tokens", "Token 数";
    dash_cost: "Cost so far", "本期费用";
    dash_latency: "Avg latency", "平均延迟";
    dash_vs_prev: "vs previous period", "与上期相比";
    dash_quota: "Included tokens", "套餐内 Token";
    dash_unlimited: "Unlimited", "不限量";
    dash_quota_used: "used of", "已用，共";
    dash_projected: "Projected month total", "预计本月总额";
    dash_daily: "Requests per day", "每日请求数";
    dash_recent_errors: "Recent errors", "最近的错误";
    dash_no_errors: "No errors this period.", "本期没有错误。";
    dash_first_call: "Make your first call", "发出第一个请求";
    dash_first_call_hint: "Create a key, then call the gateway with any OpenAI SDK: change only the base URL.", "创建密钥后，用任意 OpenAI SDK 调用网关：只需修改 base URL。";
    usage_unavailable: "Usage data is temporarily unavailable. Try again later.", "用量数据暂时不可用，请稍后再试。";
    error_rate: "Error rate", "错误率";

    keys_title: "API keys", "API 密钥";
    keys_new: "Create a key", "创建密钥";
    keys_name: "Name", "名称";
    keys_models: "Models allowed", "允许的模型";
    keys_models_hint: "Comma-separated patterns: * (all), gpt-4o*, an exact name.", "逗号分隔的模式：*（全部）、gpt-4o*、确切名称。";
    keys_endpoints: "Endpoints allowed", "允许的接口";
    keys_endpoints_hint: "Paths after /v1/, e.g. chat/completions, embeddings; * for all.", "/v1/ 之后的路径，如 chat/completions、embeddings；* 表示全部。";
    keys_rpm: "Requests per minute (optional)", "每分钟请求数（可选）";
    keys_tpm: "Tokens per minute (optional)", "每分钟 Token 数（可选）";
    keys_limits_hint: "Empty: your plan's limits.", "留空：使用套餐限制。";
    keys_expiry: "Expires in (days)", "有效期（天）";
    keys_never: "Never expires", "永不过期";
    keys_ips: "IP allowlist (optional)", "IP 白名单（可选）";
    keys_ips_hint: "Comma-separated addresses or CIDRs; empty: any address.", "逗号分隔的地址或 CIDR；留空：不限地址。";
    keys_create: "Create key", "创建密钥";
    keys_none: "No keys yet.", "还没有密钥。";
    keys_prefix: "Key", "密钥";
    keys_status: "Status", "状态";
    keys_created: "Created", "创建时间";
    keys_last_used: "Last used", "最近使用";
    keys_expires: "Expires", "过期时间";
    keys_never_short: "never", "永不";
    keys_actions: "Actions", "操作";
    keys_revoke: "Revoke", "吊销";
    keys_revoke_confirm: "Revoke this key? Calls with it stop within a second.", "确定吊销此密钥？使用它的请求将在一秒内被拒绝。";
    keys_disable: "Disable", "停用";
    keys_enable: "Enable", "启用";
    keys_rotate: "Rotate", "轮换";
    keys_grace: "Old key works for", "旧密钥保留";
    keys_grace_0: "0 (stop now)", "0（立即停止）";
    keys_grace_1h: "1 hour", "1 小时";
    keys_grace_1d: "1 day", "1 天";
    keys_grace_7d: "7 days", "7 天";
    keys_show_revoked: "Show revoked keys", "显示已吊销的密钥";
    keys_once_title: "Your new API key", "您的新 API 密钥";
    keys_once_warning: "Copy it now: it is shown this once and cannot be displayed again.", "请立即复制：密钥只显示这一次，之后无法再次查看。";
    keys_copy: "Copy", "复制";
    keys_copied: "Copied", "已复制";
    keys_back: "Back to keys", "返回密钥列表";
    keys_rotated_note: "The previous key keeps working until", "旧密钥在此时间前仍可使用：";
    keys_try: "Try it", "试一试";
    status_active: "active", "有效";
    status_disabled: "disabled", "已停用";
    status_expired: "expired", "已过期";
    status_revoked: "revoked", "已吊销";
    done_key_revoked: "Key revoked: calls with it stop within a second.", "密钥已吊销：使用它的请求将在一秒内被拒绝。";
    done_key_updated: "Key updated.", "密钥已更新。";

    usage_title: "Usage", "用量";
    usage_period: "Period", "账期";
    usage_from: "From", "开始";
    usage_to: "To", "结束";
    usage_show: "Show", "查看";
    usage_by_day: "Tokens per day, by model", "每日 Token（按模型）";
    usage_by_model: "By model", "按模型";
    usage_by_key: "By key", "按密钥";
    usage_model: "Model", "模型";
    usage_errors: "Errors", "错误";
    usage_prompt: "Prompt tokens", "输入 Token";
    usage_completion: "Completion tokens", "输出 Token";
    usage_export: "Export CSV", "导出 CSV";
    usage_none: "No usage in this range.", "该时间段没有用量。";
    usage_total: "Total", "合计";

    billing_title: "Billing", "账单";
    billing_plan: "Plan", "套餐";
    billing_per_month: "per month", "每月";
    billing_custom: "Custom pricing", "定制价格";
    billing_included: "included tokens", "套餐内 Token";
    billing_overage_on: "Usage beyond the included tokens is billed at list prices.", "超出套餐的用量按标价计费。";
    billing_overage_off: "Usage stops at the included tokens (no overage).", "用量达到套餐上限后停止（不计超额）。";
    billing_lines: "Invoice so far", "本期账单明细";
    billing_line: "Item", "项目";
    billing_quantity: "Quantity", "数量";
    billing_amount: "Amount", "金额";
    billing_subtotal: "Subtotal", "小计";
    billing_total: "Total (rounded to cents)", "合计（四舍五入到分）";
    billing_projected: "Projected at the current rate", "按当前速度预计";
    billing_change_plan: "Change plan", "更换套餐";
    billing_change_hint: "Effective now; this month is prorated between the plans.", "立即生效；本月费用按套餐使用时长分摊。";
    billing_change_button: "Change plan", "更换套餐";
    billing_plan_changed: "Plan changed.", "套餐已更换。";
    billing_invoices: "Invoices", "发票";
    billing_no_invoices: "No invoices yet: the first is issued after this month closes.", "还没有发票：本月结束后开具第一张。";
    invoice_status: "Status", "状态";
    invoice_due: "Due", "应付";
    invoice_view: "View / print", "查看 / 打印";
    billing_cycle_link: "How billing works", "计费说明";

    docs_title: "Documentation", "文档";
    docs_api_title: "Gateway API reference", "网关 API 参考";
    docs_admin_api: "Admin API reference (accounts, keys, usage, billing)", "管理 API 参考（账户、密钥、用量、账单）";
    docs_only_english: "This page is available in English only.", "此页面仅提供英文版。";

    admin_title: "Operators", "运营管理";
    admin_platform: "Platform, this period", "平台本期数据";
    admin_developers: "Developers", "开发者";
    admin_active_devs: "Active developers", "活跃开发者";
    admin_top_devs: "Top developers by cost", "费用最高的开发者";
    admin_top_models: "Models", "模型";
    admin_revenue: "Revenue", "收入";
    admin_search: "Search by email, name or id", "按邮箱、姓名或 ID 搜索";
    admin_plans: "Plans", "套餐";
    admin_role: "Role", "角色";
    admin_verified: "Verified", "已验证";
    admin_active: "Active", "启用";
    admin_save: "Save", "保存";
    admin_saved: "Saved.", "已保存。";
    admin_quota: "Monthly token quota override", "月度 Token 配额覆盖";
    admin_rpm: "Requests per minute override", "每分钟请求数覆盖";
    admin_override_hint: "Empty: the plan's.", "留空：使用套餐值。";
    admin_keys_of: "Keys", "密钥";
    admin_price: "Price", "价格";
    admin_limits: "Limits (requests / tokens per minute, concurrency)", "限制（每分钟请求 / Token、并发）";
    admin_invoiced: "Invoiced", "已开票";
    admin_paid: "Paid", "已付";
    admin_outstanding: "Outstanding", "未付";
    hooks_title: "Webhooks", "Webhooks";
    hooks_intro: "AI Hub sends the events you subscribe to, signed, to your HTTPS endpoints; failed deliveries are retried.", "AI Hub 将您订阅的事件签名后发送到您的 HTTPS 端点；投递失败会自动重试。";
    hooks_guide: "How to verify the signature", "如何验证签名";
    hooks_none: "No endpoints yet.", "还没有端点。";
    hooks_url: "Endpoint URL", "端点 URL";
    hooks_types: "Event types", "事件类型";
    hooks_types_hint: "Comma-separated: exact names, a family such as invoice.*, or * for all.", "逗号分隔：确切名称、事件族（如 invoice.*），或 * 表示全部。";
    hooks_description: "Description (optional)", "描述（可选）";
    hooks_retries: "Retries", "重试次数";
    hooks_state: "State", "状态";
    hooks_active: "active", "启用";
    hooks_disabled: "disabled", "已停用";
    hooks_new: "Add an endpoint", "添加端点";
    hooks_create: "Add endpoint", "添加端点";
    hooks_secret_title: "Your signing secret", "您的签名密钥";
    hooks_secret_warning: "Copy it now: it is shown this once. Verify every request with it.", "请立即复制：签名密钥只显示这一次。请用它验证每个请求。";
    hooks_rotated_note: "The previous secret also signs until", "旧密钥将继续签名至";
    hooks_back: "Back to webhooks", "返回 Webhooks";
    hooks_save: "Save", "保存";
    hooks_test: "Send test event", "发送测试事件";
    hooks_rotate: "Rotate secret", "轮换密钥";
    hooks_rotate_confirm: "Rotate the secret? The current one keeps signing for 24 hours.", "确定轮换签名密钥？当前密钥将继续签名 24 小时。";
    hooks_delete: "Delete", "删除";
    hooks_delete_confirm: "Delete this endpoint? Its pending deliveries stop.", "确定删除此端点？待发送的投递将停止。";
    hooks_enable: "Enable", "启用";
    hooks_disable: "Disable", "停用";
    hooks_deliveries: "Deliveries", "投递记录";
    hooks_no_deliveries: "No deliveries yet.", "还没有投递。";
    hooks_event: "Event", "事件";
    hooks_attempts: "Attempts", "尝试次数";
    hooks_last: "Last answer", "最近响应";
    hooks_next: "Next attempt", "下次尝试";
    hooks_redeliver: "Redeliver", "重新投递";
    hooks_failing_since: "Failing since", "失败开始于";
    hooks_disabled_reason: "Disabled:", "已停用：";
    done_hook_saved: "Endpoint saved.", "端点已保存。";
    done_hook_deleted: "Endpoint deleted.", "端点已删除。";
    done_hook_test: "Test event queued.", "测试事件已加入队列。";
    done_redelivered: "Delivery queued again.", "已重新加入投递队列。";
    events_title: "Events", "事件";
    events_none: "No events yet.", "还没有事件。";
    events_type: "Type", "类型";
    events_when: "When", "时间";
    events_live: "New events appear here as they happen.", "新事件发生时会实时显示在这里。";
    events_all: "All types", "全部类型";
    events_filter: "Filter", "筛选";
    events_older: "Older events", "更早的事件";
    tasks_title: "Tasks and batches", "任务与批处理";
    tasks_intro: "Long jobs run in the background: batch generations, usage exports and the OpenAI batches you create with an SDK. Progress updates live; results download here once written.", "耗时的工作在后台运行：批量生成、用量导出，以及您通过 SDK 创建的 OpenAI 批处理。进度实时更新，结果写好后可在此下载。";
    tasks_none: "No tasks yet.", "还没有任务。";
    tasks_id: "ID", "ID";
    tasks_type: "Type", "类型";
    tasks_status: "Status", "状态";
    tasks_progress: "Progress", "进度";
    tasks_counts: "Done / failed / total", "完成 / 失败 / 总数";
    tasks_counts_hint: "Under each bar: items done / failed / total.", "进度条下方：已完成 / 失败 / 总项目数。";
    tasks_created: "Created", "创建时间";
    tasks_finished: "Finished", "完成时间";
    tasks_files: "Results", "结果";
    tasks_actions: "Actions", "操作";
    tasks_result: "Result", "结果文件";
    tasks_errors: "Errors", "错误文件";
    tasks_cancel: "Cancel", "取消";
    tasks_cancel_confirm: "Cancel this task? Queued items stop now; running ones finish.", "确定取消此任务？排队中的项目立即停止，运行中的项目会完成。";
    tasks_all: "All statuses", "全部状态";
    tasks_filter: "Filter", "筛选";
    tasks_older: "Older tasks", "更早的任务";
    tasks_newest: "Newest tasks", "最新的任务";
    tasks_live: "Progress of unfinished tasks updates here as they run.", "未完成任务的进度会在此实时更新。";
    tasks_type_batch_generate: "Batch generation", "批量生成";
    tasks_type_usage_export: "Usage export", "用量导出";
    tasks_type_openai_batch: "OpenAI batch", "OpenAI 批处理";
    tasks_status_pending: "pending", "等待中";
    tasks_status_running: "running", "运行中";
    tasks_status_completed: "completed", "已完成";
    tasks_status_failed: "failed", "失败";
    tasks_status_cancelled: "cancelled", "已取消";
    tasks_new_generate: "Batch generation", "批量生成";
    tasks_generate_hint: "One chat completion per prompt, run through the gateway as your newest active API key.", "每条提示词一次对话补全，以您最新的有效 API 密钥通过网关运行。";
    tasks_model: "Model", "模型";
    tasks_prompts: "Prompts, one per line", "提示词（每行一条）";
    tasks_max_tokens: "Max tokens (optional)", "最大 Token 数（可选）";
    tasks_generate: "Queue the generation", "提交批量生成";
    tasks_new_export: "Usage export", "用量导出";
    tasks_export_hint: "Every request of a month as CSV, written in the background.", "某月的全部请求导出为 CSV，在后台生成。";
    tasks_period: "Month (YYYY-MM)", "月份（YYYY-MM）";
    tasks_export: "Queue the export", "提交导出";
    done_task_created: "Task queued: its progress shows below.", "任务已提交：进度显示在下方。";
    done_task_cancelled: "Cancelling: queued items stop now, running ones finish.", "正在取消：排队中的项目立即停止，运行中的项目会完成。";
    alert_title: "Usage alert", "用量提醒";
    alert_used: "of this month's token quota used", "本月 Token 配额已使用";
    yes: "yes", "是";
    no: "no", "否";

    error_title: "Something went wrong", "出错了";
    error_not_found: "This page does not exist.", "页面不存在。";
    error_csrf: "The form expired or did not come from this site. Reload the page and try again.", "表单已过期或不是来自本站，请刷新页面后重试。";
    error_back: "Back to the dashboard", "返回概览";
    field_errors: "Please correct the highlighted fields.", "请修正标出的字段。";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_cookie_then_browser_then_english() {
        assert_eq!(Lang::pick(Some("zh"), Some("en-US")), Lang::Zh);
        assert_eq!(Lang::pick(None, Some("zh-CN,zh;q=0.9,en;q=0.8")), Lang::Zh);
        assert_eq!(Lang::pick(Some("xx"), Some("fr-FR, en;q=0.5")), Lang::En);
        assert_eq!(Lang::pick(None, None), Lang::En);
        assert_eq!(Lang::Zh.texts().nav_keys, "API 密钥");
    }
}
